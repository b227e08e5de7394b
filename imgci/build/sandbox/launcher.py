"""The build process's side of the sandbox: start ``python -m imgci._sandbox`` for one RUN and collect its layer.

Contract of :meth:`Sandbox.run`:
- The child is started with ``subprocess`` (fork+exec, safe in this threaded process) with a clean environment and
  only three pipes besides stdio: the spec goes in on stdin, events come back on stdout, the command's output on
  one pipe and the layer tar on another. No other file descriptor of this process reaches it.
- In ``userns`` isolation this process writes the child's uid/gid maps (``newuidmap``/``newgidmap`` with the
  user's subordinate ranges, a full identity map as root, or a single-id map) when the child asks.
- Output lines go to ``log`` as they come, with secret values (raw and base64) replaced by ``****``; the last 20
  are kept for the error. A non-zero exit raises :class:`BuildError` naming the command and the exit code.
- The layer tar is compressed into the store and unpacked into the layer store while the child writes it.
- ``check()`` is polled while the step runs; when it raises (the build was cancelled), the child is killed,
  its work directory removed, and the exception propagates.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from imgci import child_pythonpath
from imgci.build.sandbox import child_python
from imgci.build.sandbox.spec import ChildSpec, IdKind, LayerRef, MountSpec, ProcessSpec
from imgci.errors import BuildError
from imgci.oci import Digest

TAIL_LINES = 20


@dataclass
class RunRequest:
    """One RUN: the root file system's layers, the process, its mounts and network."""

    layers: list[LayerRef]
    process: ProcessSpec
    mounts: list[MountSpec] = field(default_factory=list)
    network: str = "host"
    compression: str = "gzip"
    epoch: int | None = None
    description: str = ""  # for messages: the Dockerfile instruction


@dataclass
class RunOutcome:
    result: Any  # imgci.build.layer.LayerResult
    layer_dir: Path
    changes: int
    warnings: list[str]


class RunFailed(BuildError):
    """The RUN command exited non-zero (``exit_code``, ``tail``: its last output lines)."""

    def __init__(self, message: str, *, exit_code: int, tail: list[str], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.exit_code = exit_code
        self.tail = tail


class _Redactor:
    def __init__(self, values: list[bytes]) -> None:
        words: set[str] = set()
        for v in values:
            # the value, without its final newline, each of its lines (a PEM key), and their base64 forms
            forms = {v, v.rstrip(b"\r\n"), *(line.strip() for line in v.splitlines())}
            for form in forms:
                if len(form) < 4:
                    continue
                words.add(form.decode("utf-8", "replace"))
                words.add(base64.b64encode(form).decode())
                words.add(base64.b64encode(form).decode().rstrip("="))
        self.words = sorted(words, key=len, reverse=True)

    def __call__(self, line: str) -> str:
        for w in self.words:
            if w and w in line:
                line = line.replace(w, "****")
        return line


class Sandbox:
    """Runs RUN steps for one build. ``choice`` is :class:`imgci.build.sandbox.probe.Choice`."""

    def __init__(self, state_dir: Path, choice: Any, layer_store: Any, *, on_warning: Callable[[str], None]) -> None:
        self.state_dir = Path(os.path.abspath(state_dir))  # the child runs in "/": every path it gets is absolute
        self.choice = choice
        self.layers = layer_store
        self.on_warning = on_warning
        flavor = "user" if choice.isolation == "userns" else "trusted"
        self.snapshot_dir = self.state_dir / "snapshots" / flavor
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.state_dir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @property
    def id_kind(self) -> IdKind:
        kind: IdKind = self.choice.idmap.kind
        return kind

    def _spec(self, **kw: Any) -> ChildSpec:
        return ChildSpec(
            isolation=self.choice.isolation,
            backend=self.choice.backend,
            id_kind=self.id_kind,
            state_dir=str(self.state_dir),
            snapshot_dir=str(self.snapshot_dir),
            **kw,
        )

    # -- running a step -------------------------------------------------------------------------------------------
    def run(
        self,
        req: RunRequest,
        *,
        log: Callable[[str], None],
        check: Callable[[], None],
        secret_values: list[bytes] | None = None,
    ) -> RunOutcome:
        work = self.tmp / f"run-{os.getpid()}-{secrets.token_hex(6)}"
        work.mkdir()
        for ref in [*req.layers, *(r for m in req.mounts for r in m.layers)]:
            ref.blob = os.path.abspath(ref.blob)
        for m in req.mounts:
            if m.source:
                m.source = os.path.abspath(m.source)
        spec = self._spec(
            action="run",
            work_dir=str(work),
            layers=req.layers,
            network="none" if req.network == "none" else "host",
            mounts=req.mounts,
            process=req.process,
            hosts=_hosts(req.process.hostname),
            resolv=_resolv(),
            epoch=req.epoch,
        )
        redact = _Redactor(secret_values or [])
        out_r, out_w = os.pipe()
        tar_r, tar_w = os.pipe()
        try:
            proc, (spec.output_fd, spec.tar_fd) = self._start(pass_fds=(out_w, tar_w))
        except BaseException:
            for fd in (out_r, out_w, tar_r, tar_w):
                os.close(fd)
            shutil.rmtree(work, ignore_errors=True)
            raise
        os.close(out_w)
        os.close(tar_w)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        layer_box: list[Any] = []
        failures: list[BaseException] = []

        def read_output() -> None:
            with open(out_r, "rb", buffering=0) as f:
                pending = b""
                while chunk := f.read(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        # progress redrawn with carriage returns: keep what the terminal would finally show
                        parts = [p for p in raw.split(b"\r") if p]
                        line = redact((parts[-1] if parts else b"").decode("utf-8", "replace"))
                        tail.append(line)
                        log(line)
                if pending:
                    line = redact(pending.decode("utf-8", "replace"))
                    tail.append(line)
                    log(line)

        def read_tar() -> None:
            with open(tar_r, "rb") as f:
                head = f.read(1)
                if not head:
                    return
                try:
                    layer_box.append(self.layers.write_layer_stream(_Prefixed(head, f), compression=req.compression))
                except BaseException as e:
                    failures.append(e)
                    with contextlib.suppress(OSError):
                        while f.read(1 << 20):
                            pass

        readers = [
            threading.Thread(target=read_output, name="imgci-run-output", daemon=True),
            threading.Thread(target=read_tar, name="imgci-run-layer", daemon=True),
        ]
        for t in readers:
            t.start()
        try:
            events = self._converse(proc, spec, check)
            for t in readers:
                t.join()
        except BaseException:
            _kill(proc)
            for t in readers:
                t.join(timeout=10)
            self.cleanup(work)
            raise
        finally:
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
        if work.exists():
            self.cleanup(work)
        warnings = [e["message"] for e in events if e["event"] == "warning"]
        for w in warnings:
            self.on_warning(w)
        errors = [e["message"] for e in events if e["event"] == "error"]
        if errors:
            from imgci.build.sandbox.probecache import forget

            forget(self.state_dir)  # what the probes promised did not hold: probe again next time
            raise BuildError(f"the sandbox could not run {req.description or 'the step'}: {errors[0]}")
        exits = [e["code"] for e in events if e["event"] == "exit"]
        if not exits:
            stderr = (proc.stderr.read() if proc.stderr else b"").decode("utf-8", "replace").strip()
            raise BuildError(
                f"the sandbox ended without running the command (status {proc.returncode}): {stderr[-2000:]}"
            )
        code = exits[0]
        if code != 0:
            shown = " ".join(req.process.args)
            raise RunFailed(
                f"process {shown!r} did not complete successfully: exit code: {code}", exit_code=code, tail=list(tail)
            )
        if failures:
            raise failures[0]
        layer_events = [e for e in events if e["event"] == "layer"]
        if not layer_box or not layer_events:
            raise BuildError("the sandbox reported success but sent no layer")
        result, layer_dir = layer_box[0]
        info = layer_events[0]
        if result.diff_id != Digest(info["diff_id"]):
            raise BuildError(f"the RUN layer arrived as {result.diff_id}, the sandbox wrote {info['diff_id']}")
        result = replace(result, entry_count=int(info["entries"]))
        return RunOutcome(result, layer_dir, int(info["changes"]), warnings)

    def _start(self, pass_fds: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        """A child and the numbers under which it sees ``pass_fds``: forked by the fork server when it works
        (fds 3, 4, …), else a fresh ``python -m imgci._sandbox`` (same numbers)."""
        from imgci.build.sandbox.forkserver import ForkServerError

        server = _fork_server()
        if server is not None:
            try:
                return server.spawn(pass_fds), tuple(range(3, 3 + len(pass_fds)))
            except ForkServerError as e:
                _disable_fork_server(str(e))
        proc = subprocess.Popen(
            [*child_python(), "imgci._sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            close_fds=True,
            env=_child_env(),
            cwd="/",
            start_new_session=True,
        )
        return proc, pass_fds

    def _converse(self, proc: Any, spec: ChildSpec, check: Callable[[], None]) -> list[dict[str, Any]]:
        """Send the spec, answer ``maps``, collect events until ``done`` (polling ``check``)."""
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(spec.dumps().encode() + b"\n")
        proc.stdin.flush()
        events: list[dict[str, Any]] = []
        lines: collections.deque[bytes | None] = collections.deque()
        ready = threading.Event()

        def pump(stdout: IO[bytes]) -> None:
            for raw in stdout:
                lines.append(raw)
                ready.set()
            lines.append(None)
            ready.set()

        threading.Thread(target=pump, args=(proc.stdout,), name="imgci-run-events", daemon=True).start()
        while True:
            ready.wait(0.2)
            ready.clear()
            check()
            while lines:
                raw = lines.popleft()
                if raw is None:
                    return events
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("event") == "maps":
                    self._map(int(ev["pid"]))
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                    continue
                events.append(ev)

    def _map(self, pid: int) -> None:
        from imgci.build.sandbox.idmap import apply_idmap

        apply_idmap(pid, self.choice.idmap)

    # -- cleanup ---------------------------------------------------------------------------------------------------
    def cleanup(self, *paths: Path) -> None:
        """Remove directories the child made (files of other ids too: from a namespace when not root)."""
        from imgci.build.sandbox.cleanup import remove_owned

        for problem in remove_owned(list(paths)):
            self.on_warning(problem)


class _Prefixed:
    """A reader that yields ``head`` and then the rest of ``f``."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        self.head = head
        self.f = f

    def read(self, n: int = -1, /) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            return head + self.f.read(max(n - len(head), 0)) if n > 1 else head
        return self.f.read(n)


def _kill(proc: Any) -> None:
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def _child_env() -> dict[str, str]:
    """The sandbox interpreters' environment (see :func:`imgci.build.sandbox.child_python`)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONPATH": child_pythonpath()}


_FORK_SERVER_LOCK = threading.Lock()
_FORK_SERVER: list[Any] = []  # [ForkServer] once made; [None] when disabled


def _fork_server() -> Any:
    """The process's fork server (made on first use), or None when disabled (IMGCI_SANDBOX_FORK_SERVER=0) or
    broken (then every child is a fresh interpreter, as before)."""
    with _FORK_SERVER_LOCK:
        if not _FORK_SERVER:
            if os.environ.get("IMGCI_SANDBOX_FORK_SERVER", "1") == "0":
                _FORK_SERVER.append(None)
            else:
                from imgci.build.sandbox.forkserver import ForkServer

                _FORK_SERVER.append(ForkServer(_child_env()))
        return _FORK_SERVER[0]


_PRESTARTS = [0]  # builds running that asked for a prestart (under _FORK_SERVER_LOCK)


@contextlib.contextmanager
def fork_server_prestarted() -> Iterator[None]:
    """For a build that has RUN steps: the process's fork server starts in the background (see
    :meth:`ForkServer.prestart`), and when the last such build of the process ends without having run a step in
    it, it is stopped (:meth:`ForkServer.discard_unused`). Nothing when the fork server is disabled."""
    server = _fork_server()
    if server is None:
        yield
        return
    with _FORK_SERVER_LOCK:
        _PRESTARTS[0] += 1
    server.prestart()
    try:
        yield
    finally:
        with _FORK_SERVER_LOCK:
            _PRESTARTS[0] -= 1
            last = _PRESTARTS[0] == 0
        if last:
            server.discard_unused()


def _disable_fork_server(reason: str) -> None:
    import logging

    logging.getLogger("imgci.sandbox").info("sandbox fork server disabled: %s", reason)
    with _FORK_SERVER_LOCK:
        server = _FORK_SERVER[0] if _FORK_SERVER else None
        _FORK_SERVER[:] = [None]
    if server is not None:
        server.close()


def _hosts(hostname: str) -> str:
    return f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"  # as BuildKit writes it


def _resolv() -> str:
    """The host's resolver configuration (what a RUN on the host network needs); a public fallback if none."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", ";"))]
    return "\n".join(lines) + "\n" if lines else ""
