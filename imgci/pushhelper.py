"""``build --push`` pushes from a helper process forked when the build starts.

A fresh ``imgci build --push`` spends ~0.1 s of CPU before its push can send a byte: importing the HTTP stack
(requests alone ≈ 40 ms), loading CA certificates, the TLS handshake, the registry's auth challenge, a push token.
In a thread that work takes turns with the build on one interpreter lock; in a forked process it runs on another CPU
while the build runs, and the build process never imports the HTTP stack at all when its base images are local.

Contract:
- :meth:`PushHelper.start` forks, only from a process that has no other thread (else it returns None and the
  caller pushes in-process). The child connects to every registry it will push to (best effort, see
  :meth:`imgci.registry.transport.Transport.warm_up`), then reads requests, JSON lines on a pipe.
- :meth:`PushHelper.announce` (during the build) passes a blob of the image that is in the store now; the child
  pushes it to every destination at once (:class:`imgci.transfer.PrePush`), while the build goes on.
- :meth:`PushHelper.push` sends the request — the local image names to push (each is also its destination) — and
  waits for the answer. The child opens the state directory itself (never the parent's SQLite connection), pushes
  the names in order with :func:`imgci.transfer.push_image` and answers each name's digest, stopping at the first
  error; the parent raises that error as the same imgci error class, with its message and hint.
- :meth:`PushHelper.close` (also when the build failed: nothing is pushed) ends the child and reaps it. The child
  also ends when the parent dies (``PR_SET_PDEATHSIG``) or closes the request pipe, and it leaves with
  ``os._exit``: it never runs the parent's code after the fork point.
- ``IMGCI_PUSH_HELPER=0`` turns the helper off.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgci.errors import ImgciError, from_report

_PR_SET_PDEATHSIG = 1


class PushHelper:
    """The parent's handle on the forked push helper."""

    def __init__(self, pid: int, request_fd: int, answer_fd: int) -> None:
        self.pid = pid
        self._request_fd = request_fd
        self._answer_fd = answer_fd
        self._done = False

    @classmethod
    def start(cls, store_root: Path, names: list[str], client_factory: Callable[[str], Any]) -> PushHelper | None:
        """Fork the helper for pushing ``names`` (their registries are connected to at once), or None where it
        cannot be (other threads running, fork failing, turned off)."""
        if os.environ.get("IMGCI_PUSH_HELPER", "1") == "0" or threading.active_count() > 1 or not names:
            return None
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # what is buffered now must not be written twice
        try:
            pid = os.fork()
        except OSError:
            for fd in (request_r, request_w, answer_r, answer_w):
                os.close(fd)
            return None
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.close(request_w)
                os.close(answer_r)
                code = _serve(store_root, names, client_factory, request_r, answer_w)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(request_r)
        os.close(answer_w)
        return cls(pid, request_w, answer_r)

    def announce(self, descriptor: Any) -> None:
        """A blob of the image to be pushed, in the store now (a layer the build just wrote, or one its image
        starts from): the helper pushes it to every destination right away (see :class:`imgci.transfer.PrePush`).
        Best effort: a helper that is gone says so at :meth:`push`."""
        if self._done:
            return
        blob = {"mediaType": descriptor.media_type, "digest": descriptor.digest.value, "size": descriptor.size}
        message = {"blob": blob}
        with contextlib.suppress(OSError):
            _write_all(self._request_fd, json.dumps(message).encode() + b"\n")

    def push(self, names: list[str]) -> tuple[dict[str, str], float]:
        """Push ``names`` (local image names, each its own destination) in the helper: {name: digest} and the
        seconds the pushes took there. Raises the first error, as the same imgci error class."""
        if self._done:
            raise RuntimeError("the push helper has pushed already")
        self._done = True
        try:
            _write_all(self._request_fd, json.dumps({"push": names}).encode() + b"\n")
        except OSError:
            pass  # the helper is gone: its (missing) answer says so below
        os.close(self._request_fd)
        answer = _read_all(self._answer_fd)
        os.close(self._answer_fd)
        _, status = os.waitpid(self.pid, 0)
        try:
            doc = json.loads(answer) if answer else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            code = os.waitstatus_to_exitcode(status)
            raise ImgciError(f"the push helper process ended without an answer (exit status {code})")
        if doc.get("error"):
            raise _rebuild(doc["error"])
        return {r["name"]: r["digest"] for r in doc["pushed"]}, float(doc.get("seconds", 0.0))

    def close(self) -> None:
        """End the helper without a push (a failed build), unless :meth:`push` ran; reap it either way."""
        if self._done:
            return
        self._done = True
        for fd in (self._request_fd, self._answer_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)  # it may be inside a connect timeout: do not wait for that
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _serve(
    store_root: Path, names: list[str], client_factory: Callable[[str], Any], request_fd: int, answer_fd: int
) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C on the terminal ends the helper as it ends the build
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        return 0  # the parent died before prctl
    from imgci import reference
    from imgci.oci import Descriptor, Digest
    from imgci.store import Store
    from imgci.transfer import PrePush, push_image

    connect(names, client_factory)
    pushed: list[dict[str, str]] = []
    error: dict[str, Any] | None = None
    ahead: dict[str, PrePush] = {}  # destination name -> its blobs pushed ahead (made at the first blob)
    wanted: list[str] | None = None
    with Store(store_root) as store:  # opened before the build ends; it reads what the build committed by then
        try:
            for message in _messages(request_fd):
                if "push" in message:
                    wanted = message["push"]
                    break
                blob = message["blob"]
                desc = Descriptor(blob["mediaType"], Digest(blob["digest"]), int(blob["size"]))
                for name in names:
                    if name not in ahead:
                        ahead[name] = PrePush(store, reference.parse(name), client_factory=client_factory)
                    ahead[name].add(desc)
            if wanted is None:
                return 0  # no push: the build failed or needs none
            started = time.monotonic()
            for name in wanted:
                try:
                    ref = reference.parse(name)
                    result = push_image(store, name, ref, client_factory=client_factory, prepush=ahead.pop(name, None))
                except ImgciError as e:
                    error = e.report()
                    break
                pushed.append({"name": name, "digest": result.digest.value})
        finally:
            for prepush in ahead.values():
                prepush.close()
    answer = {"pushed": pushed, "error": error, "seconds": time.monotonic() - started}
    _write_all(answer_fd, json.dumps(answer).encode())
    return 0


def _messages(fd: int) -> Iterator[dict[str, Any]]:
    """The JSON lines the parent writes on the request pipe, until it closes it."""
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


def connect(names: list[str], client_factory: Callable[[str], Any]) -> None:
    """Connect, best effort, to every repository ``names`` will be pushed to (see
    :meth:`imgci.registry.transport.Transport.warm_up`)."""
    from imgci import reference

    for registry, repository in sorted({(r.registry, r.repository) for r in map(reference.parse, names)}):
        client_factory(registry).warm_up(repository, push=True)


def _rebuild(error: dict[str, Any]) -> ImgciError:
    """The helper's error as the same class of :mod:`imgci.errors` (message and hint; other fields are only
    for the helper's own retries), or an ImgciError where that class needs more to be made."""
    rebuilt = from_report(error)
    if rebuilt is not None:
        return rebuilt
    return ImgciError(str(error.get("message", "push failed")), hint=error.get("hint"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)
