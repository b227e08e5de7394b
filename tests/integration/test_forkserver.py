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
    """Requests from many threads in flight at once: each thread must get its own child (its pid, its pipes, its
    status) — half of them kill theirs, half let it fail, so a mix-up shows as a wrong status or a hang."""
    results: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def one(n: int) -> None:
        start.wait()
        child = server.spawn()
        if n % 2:
            child.send_signal(signal.SIGKILL)
        else:
            child.stdin.write(b"{}\n")  # a spec with no fields: an error event, exit 1
        child.stdin.close()
        child.stdout.read()  # EOF only when this thread's own child is gone
        code = child.wait(timeout=20)
        with lock:
            results[n] = (child.pid, code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8
    assert len({pid for pid, _ in results.values()}) == 8
    assert {n: code for n, (_, code) in results.items()} == {n: -signal.SIGKILL if n % 2 else 1 for n in range(8)}


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


def test_a_prestarted_server_is_the_one_spawn_uses(server: ForkServer) -> None:
    server.prestart()
    assert server._proc is not None
    started = server._proc.pid
    assert list(server._proc.args[1:4]) == ["-S", "-m", "imgci._sandbox"]  # type: ignore[index]  # no site module
    server.prestart()  # once only
    assert server._proc.pid == started
    child = server.spawn()
    child.stdin.close()
    assert child.wait(timeout=10) == 1
    assert server._proc.pid == started  # no second interpreter


def test_a_prestarted_server_nobody_used_goes_away_quietly(tmp_path: Path) -> None:
    """A build with RUN steps that were all cached prestarts the server and exits without using it: the server
    must exit, and print nothing (it shares the build's stderr)."""
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)  # the server inherits stderr
        try:
            s = ForkServer(_child_env())
            s.prestart()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    assert s._proc is not None
    proc = s._proc
    s.close()  # before the server said it is ready
    assert proc.wait(timeout=10) == 0
    assert err.read_bytes() == b""


def test_a_prestarted_server_nobody_took_is_stopped_at_once_and_a_later_spawn_starts_another(
    server: ForkServer,
) -> None:
    """At the end of a build whose RUN steps were all cached: left to notice the closed socket by itself, the
    still-starting server would hold the build's stderr open for tens of ms after the build exits."""
    server.prestart()
    assert server._proc is not None
    proc = server._proc
    server.discard_unused()
    assert proc.poll() == -signal.SIGKILL  # stopped and reaped by discard_unused, not left starting
    assert server._proc is None
    child = server.spawn()  # a later RUN: a new server
    child.stdin.close()
    assert child.wait(timeout=10) == 1
    assert server._proc is not None and server._proc.pid != proc.pid
    server.discard_unused()  # it is in use: kept
    assert server._proc.poll() is None


def test_the_prestarted_server_is_kept_while_another_build_that_prestarted_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`imgci run` builds entries in parallel in one process: the first to end must not stop the server the
    others prestarted."""
    from imgci.build.sandbox import launcher

    s = ForkServer(_child_env())
    monkeypatch.setattr(launcher, "_FORK_SERVER", [s])
    monkeypatch.setattr(launcher, "_PRESTARTS", [0])
    try:
        with launcher.fork_server_prestarted():
            assert s._proc is not None
            proc = s._proc
            with launcher.fork_server_prestarted():
                pass
            assert proc.poll() is None  # the outer build still runs
        assert proc.poll() == -signal.SIGKILL
    finally:
        s.close()


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


def test_answers_are_matched_to_their_requests_whatever_the_order() -> None:
    """Each spawn gets the answer to its own request (by id), even when answers come in another order than the
    requests went: the pipes a thread holds and the pid it is told must belong to the same child."""
    import array
    import socket

    fs = ForkServer({})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fs._sock = ours
    threading.Thread(target=fs._read, args=(ours,), daemon=True).start()
    got: list[tuple[int, bytes]] = []

    def one() -> None:
        child = fs.spawn()
        got.append((child.pid, child.stdout.read()))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    requests = []
    for _ in range(2):  # the fake server: take both requests, then answer the second first
        data, anc, _, _ = theirs.recvmsg(1024, socket.CMSG_SPACE(8 * 4))
        fds = array.array("i")
        fds.frombytes(anc[0][2])
        requests.append((json.loads(data)["id"], list(fds)))
    for request, fds in reversed(requests):
        os.write(fds[1], str(request).encode())  # the child's stdout says which request it answers
        for fd in fds:
            os.close(fd)
        theirs.send(json.dumps({"id": request, "pid": 1000 + request}).encode())
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == [(1000 + r, str(r).encode()) for r, _ in sorted(requests)]
    theirs.close()
    fs.close()
