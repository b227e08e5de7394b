"""``imgci.cli.run``, the console script's entry: it leaves without the interpreter's teardown, but with the exit
code, the exit handlers and everything written to stdout/stderr as a normal exit has them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO


def _run(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    program = textwrap.dedent(code) + f"\nsys.argv = ['imgci', *{list(argv)!r}]\nfrom imgci.cli import run\nrun()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual in a pipe
    cmd = [sys.executable, "-c", "import sys\n" + program]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_the_exit_code_and_the_output_are_those_of_main() -> None:
    version = subprocess.run([sys.executable, "-m", "imgci", "version"], cwd=REPO, capture_output=True, text=True)
    assert version.returncode == 0
    assert version.stdout.startswith("imgci version ")
    bad = subprocess.run([sys.executable, "-m", "imgci", "build", "/nonexistent/ctx"], cwd=REPO, capture_output=True)
    assert bad.returncode == 2
    assert b"error: build context /nonexistent/ctx is not a directory" in bad.stderr


def test_exit_handlers_run_and_what_they_write_is_flushed() -> None:
    # 256 KiB through a pipe: more than its buffer, so the flush has to write while the reader reads
    done = _run(
        """
        import atexit, sys
        atexit.register(lambda: (sys.stdout.write("x" * 262144), sys.stdout.write("\\nhandler ran\\n")))
        """,
        "version",
    )
    assert done.returncode == 0
    assert done.stdout.endswith("x" * 262144 + "\nhandler ran\n")


def test_a_running_non_daemon_thread_is_waited_for_as_by_a_normal_exit() -> None:
    done = _run(
        """
        import sys, threading, time
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        """,
        "version",
    )
    assert done.returncode == 0
    assert done.stdout.rstrip().endswith("thread finished")


def test_the_state_index_is_closed_as_by_a_normal_exit(tmp_path: Path) -> None:
    """Closing the SQLite connections (the main thread's and those other threads opened) checkpoints the
    write-ahead log into index.db and removes it; a state directory copied after `imgci` exits (a CI cache) is
    then one file, and a disk that filled up afterwards still makes the next command say so."""
    state = tmp_path / "state"
    done = _run(
        f"""
        import threading
        from imgci.store import Store
        store = Store({str(state)!r})
        def other():
            with store.transaction() as db:
                db.execute("PRAGMA user_version")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        """,
        "--state",
        str(state),
        "ls",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in state.glob("index.db*")) == ["index.db"]


def test_a_build_leaves_no_write_ahead_log_in_the_state(tmp_path: Path) -> None:
    """The state index and the context's stat cache (both SQLite) are closed when a build ends."""
    state, ctx = tmp_path / "state", tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY a /a\n")
    (ctx / "a").write_text("a\n")
    done = _run("", "--state", str(state), "build", "-q", "-t", "localhost/x:1", str(ctx))
    assert done.returncode == 0, done.stderr
    assert list(state.rglob("*.sqlite")), "the context's stat cache was not used"
    assert [p for p in state.rglob("*") if p.name.endswith(("-wal", "-shm"))] == []
