"""A fork server for sandbox children: one warm, single-threaded ``python -m imgci._sandbox --fork-server`` process
that forks a child per RUN, instead of starting a fresh interpreter for each (~80 ms of a small step's ~95 ms).

Contract:
- The server is started with ``subprocess`` from the (threaded) build process, like every sandbox child, with a
  clean environment and a single extra file descriptor: its end of a ``SOCK_SEQPACKET`` socket pair. It imports
  the child's modules once, then serves requests; it never starts a thread, so forking it is safe.
- A request carries the child's stdin, stdout and stderr pipes and its extra fds (``SCM_RIGHTS``). The server forks;
  the new process starts a session, places the fds at 0, 1, 2, 3, 4…, closes every other descriptor, restores
  default signal handling and runs :func:`imgci.build.sandbox.child.main` — the same code ``python -m
  imgci._sandbox`` runs. The server answers the pid, reaps the child and reports its wait status.
- The server exits when the build process closes the socket (or dies); children it forked keep their own pipes
  and notice the build process going away as before (EOF on stdin).
- :class:`ForkedChild` looks like the ``subprocess.Popen`` the launcher used (stdin/stdout/stderr files, ``pid``,
  ``returncode``, ``wait``, ``send_signal``, ``kill``), so the conversation with a child is the same either way.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any

from imgci.build.sandbox import child_python

_MAX_FDS = 8
_MSG = 65536


# -- the build process's side -------------------------------------------------------------------------------------
class ForkServerError(OSError):
    """The fork server is not (or no longer) usable; the caller starts children the slow way."""


class ForkedChild:
    """A child forked by the server, with the ``Popen`` surface the launcher uses."""

    def __init__(self, server: ForkServer, pid: int, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self._server = server
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_status(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status) if status >= 0 else -1
        self._exited.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"sandbox child {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The build process's handle on one fork server (started lazily by :meth:`spawn`)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._lock = threading.Lock()  # one request at a time on the socket
        self._sock: socket.socket | None = None
        self._starting: socket.socket | None = None  # started by prestart, its hello not read yet
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: dict[int, ForkedChild] = {}
        self._early: dict[int, int] = {}  # statuses that came before the child was registered
        self._pending: dict[int, threading.Event] = {}  # request id -> set when its answer came
        self._answers: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._broken = False

    def prestart(self) -> None:
        """Start the server now without waiting for it (a build that is going to run RUN steps): its interpreter
        start (~80 ms) then overlaps the build's own work instead of delaying the first RUN. Best effort: the
        first :meth:`spawn` waits for it, or starts one itself."""
        with self._lock:
            if self._sock is not None or self._starting is not None or self._broken:
                return
            with contextlib.suppress(OSError):
                self._starting = self._launch()

    def discard_unused(self) -> None:
        """Stop a prestarted server that no :meth:`spawn` has taken (the build's RUN steps were all cached), at
        once: it is still starting, and left to notice the closed socket by itself it would keep the build's
        stderr open, so a caller that reads that to its end (a CI runner) waits ~50 ms more. A later
        :meth:`spawn` starts a new one."""
        with self._lock:
            starting, self._starting = self._starting, None
            proc = self._proc if starting is not None else None
            if proc is not None:
                self._proc = None
        if starting is not None:
            starting.close()
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()  # it has not started anything: no child of it runs a step
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def _start(self) -> socket.socket:
        starting, self._starting = self._starting, None
        return self._confirm(starting if starting is not None else self._launch())

    def _launch(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [*child_python(), "imgci._sandbox", "--fork-server", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env=self._env,
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def _confirm(self, ours: socket.socket) -> socket.socket:
        ours.settimeout(None)
        hello = ours.recv(_MSG)
        if hello != b'{"ready": true}':
            ours.close()
            raise ForkServerError(f"the sandbox fork server did not start ({hello!r})")
        threading.Thread(target=self._read, args=(ours,), name="imgci-forkserver", daemon=True).start()
        return ours

    def _read(self, sock: socket.socket) -> None:
        """Dispatch the server's messages: answers to requests (in order) and children's exit statuses."""
        while True:
            try:
                data = sock.recv(_MSG)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    self._broken = True
                    children = list(self._children.values())
                    pending, self._pending = list(self._pending.values()), {}
                for orphan in children:
                    orphan._set_status(-1)
                for ev in pending:
                    ev.set()
                return
            msg = json.loads(data)
            if "status" in msg:
                with self._lock:
                    child = self._children.pop(msg["pid"], None)
                    if child is None:
                        self._early[msg["pid"]] = msg["status"]
                if child is not None:
                    child._set_status(msg["status"])
            else:  # the answer to request msg["id"] (requests from several threads may be in flight)
                with self._lock:
                    self._answers[msg["id"]] = msg
                    waiter = self._pending.pop(msg["id"], None)
                if waiter is not None:
                    waiter.set()

    def spawn(self, extra_fds: tuple[int, ...] = ()) -> ForkedChild:
        """A new child with fresh stdin/stdout/stderr pipes; ``extra_fds`` become its fds 3, 4, …"""
        if len(extra_fds) > _MAX_FDS - 3:
            raise ValueError("too many fds for a sandbox child")
        with self._lock:
            if self._broken:
                raise ForkServerError("the sandbox fork server is gone")
            if self._sock is None:
                self._sock = self._start()
            sock = self._sock
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        theirs = [in_r, out_w, err_w, *extra_fds]
        ev = threading.Event()
        try:
            with self._lock:
                request = self._next_id
                self._next_id += 1
                self._pending[request] = ev
                fds = array.array("i", theirs).tobytes()
                sock.sendmsg([json.dumps({"id": request}).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            ev.wait()
            with self._lock:
                answer = self._answers.pop(request, {"error": "the sandbox fork server is gone"})
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if "pid" not in answer:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise ForkServerError(f"the sandbox fork server could not fork: {answer.get('error')}")
        child = ForkedChild(
            self, int(answer["pid"]), os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb")
        )
        with self._lock:
            self._children[child.pid] = child
            early = self._early.pop(child.pid, None)
        if early is not None:
            child._set_status(early)
        return child

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock or self._starting, None
            self._starting = None
            self._broken = True
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)


# -- the server's side ------------------------------------------------------------------------------------------
def serve(fd: int) -> None:
    """Run the fork server on socket ``fd`` until the build process closes it."""
    import imgci.build.layer
    import imgci.build.sandbox.child
    import imgci.build.sandbox.diff
    import imgci.build.sandbox.snapshots  # noqa: F401
    from imgci.build.sandbox import libc

    libc.preload()
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    try:
        sock.send(b'{"ready": true}')
    except OSError:
        return  # the build process is gone already (a prestarted server whose build needed no RUN)
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(sock, children)
        if sock.fileno() not in readable:
            continue
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(_MSG, socket.CMSG_SPACE(_MAX_FDS * 4))
        except OSError:
            data = b""
        if not data:
            return
        request = json.loads(data).get("id")
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        try:
            pid = os.fork()
        except OSError as e:
            for f in fds:
                os.close(f)
            with contextlib.suppress(OSError):  # the build process is gone: the next recv says so
                sock.send(json.dumps({"id": request, "error": str(e)}).encode())
            continue
        if pid == 0:
            _become_child(list(fds))
        for f in fds:
            os.close(f)
        children.add(pid)
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"id": request, "pid": pid}).encode())
        _reap(sock, children)


def _reap(sock: socket.socket, children: set[int]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            continue
        if done:
            children.discard(pid)
            with contextlib.suppress(OSError):
                sock.send(json.dumps({"pid": pid, "status": status}).encode())


def _become_child(fds: list[int]) -> None:
    """In the forked process: the fds in place, nothing else of the server, then the child's own main."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        high = [os.dup(f) for f in fds]  # out of the way of the targets before placing them
        for target, f in enumerate(high):
            os.dup2(f, target, inheritable=True)
        os.closerange(len(high), 1 << 20)  # the server's socket, its wakeup pipe, the copies above
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        from imgci.build.sandbox.child import main

        main()
    except BaseException:  # as a fresh interpreter would: the traceback on stderr, exit status 1
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(1)  # main never returns; anything else is a failure of this child alone
