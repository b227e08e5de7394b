"""The sandbox fork server: children forked from one warm process behave like fresh ``python -m imgci._sandbox``
processes (pipes, extra fds, exit statuses, signals), concurrently, and a server that went away is reported so
the launcher falls back to fresh interpreters."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from imgci.build.sandbox.forkserver import ForkServer, ForkServerError
from imgci.build.sandbox.launcher import _child_env
from tests.conftest import Imgci

pytestmark = pytest.mark.integration


@pytest.fixture
def server() -> ForkServer:
    s = ForkServer(_child_env())
    yield s  # type: ignore[misc]
    s.close()


def _events(raw: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in raw.splitlines() if line.startswith(b"{")]


def test_a_forked_child_runs_the_child_main_with_its_own_pipes(server: ForkServer) -> None:
    out_r, out_w = os.pipe()
    child = server.spawn((out_w,))
    os.close(out_w)
    assert child.pid != os.getpid()
    child.stdin.write(b"this is not a spec\n")
    child.stdin.close()
    assert _events(child.stdout.read()) == []
    assert child.wait(timeout=10) == 1
    assert b"JSONDecodeError" in child.stderr.read()  # the traceback a fresh interpreter would print
    # the extra fd reached the child as fd 3 and nothing was written to it; the child closed it on exit
    assert os.read(out_r, 10) == b""
    os.close(out_r)


def test_children_fork_concurrently_and_each_gets_its_own_status(server: ForkServer) -> None:
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def one() -> None:
        child = server.spawn()
        child.stdin.write(b"{}\n")  # a spec with no fields: an error event, exit 1
        child.stdin.close()
        child.stdout.read()
        code = child.wait(timeout=20)
        with lock:
            results.append((child.pid, code))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8
    assert len({pid for pid, _ in results}) == 8
    assert {code for _, code in results} == {1}


def test_a_child_can_be_killed_and_the_status_says_so(server: ForkServer) -> None:
    child = server.spawn()  # it waits for its spec on stdin
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    child.kill()  # a no-op once it exited


def test_a_server_that_went_away_is_an_error_the_launcher_can_fall_back_on(server: ForkServer) -> None:
    first = server.spawn()
    first.stdin.close()
    first.wait(timeout=10)
    assert server._proc is not None
    server._proc.kill()
    server._proc.wait(timeout=10)
    with pytest.raises(ForkServerError):
        for _ in range(50):  # the reader notices the closed socket
            server.spawn()


def test_builds_give_the_same_layers_with_and_without_the_fork_server(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {busybox}\nRUN echo one > /one && ls /proc/self/fd > /fds\nRUN --network=none cat /one > /two\n"
    )
    imgci.env["SOURCE_DATE_EPOCH"] = "0"
    digests = []
    for flag in ("1", "0"):
        imgci.env["IMGCI_SANDBOX_FORK_SERVER"] = flag
        digests.append(imgci.run("build", "--no-cache", "-q", str(ctx)).stdout.strip())
    assert digests[0] == digests[1]
