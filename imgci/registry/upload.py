"""One blob upload, monolithic (POST + PUT) or chunked (POST + PATCH… + PUT), surviving broken connections.

Contract:
- Monolithic: ``POST /v2/<repo>/blobs/uploads/`` then ``PUT <location>?digest=<d>`` with the whole blob.
- Chunked: ``PATCH <location>`` with ``Content-Range: start-end`` per chunk, the offset always taken from the
  registry's ``Range`` answer, then an empty ``PUT <location>?digest=<d>``.
- When a PATCH breaks (connection reset, 5xx) or is refused with 416, ``GET <location>`` tells how much the
  registry committed and the upload goes on from there. When the session is gone (404) or a monolithic PUT
  breaks, the upload restarts with a new POST — unless a HEAD shows the blob arrived after all.
- Every recovery counts against the transport's retry policy (attempts and total time); the final error says
  how many attempts were made. Bodies are bytes or a file sought back to the right offset, so nothing is ever
  sent from a consumed stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING
from urllib.parse import urljoin

from imgci.errors import RegistryError, RegistryProtocolError
from imgci.oci import Descriptor
from imgci.registry.responses import Operation
from imgci.registry.retry import annotate, notify

if TYPE_CHECKING:
    import requests

    from imgci.registry.transport import Transport

_RANGE = re.compile(r"^(?:bytes=)?0-(\d+)$")
_OCTET = "application/octet-stream"


class _SessionLost(RegistryError):
    """Internal: the registry no longer knows this upload session; start a new one."""


class BlobUpload:
    """Uploads one blob; ``run`` returns the blob's size once the registry has it."""

    def __init__(
        self,
        transport: Transport,
        repository: str,
        descriptor: Descriptor,
        open_fn: Callable[[], IO[bytes]],
        *,
        scopes: tuple[str, ...],
        chunked: bool,
        chunk_size: int,
        progress: Callable[[int], None] | None,
        exists: Callable[[], bool],
    ) -> None:
        self.transport = transport
        self.repository = repository
        self.descriptor = descriptor
        self.open_fn = open_fn
        self.scopes = scopes
        self.chunked = chunked
        self.chunk_size = max(1, chunk_size)
        self.progress = progress
        self.exists = exists
        self.op = Operation("upload blob to", repository, digest=descriptor.digest.value)
        self.attempts = 1
        self.restarts = 0
        self.resumes = 0
        self._started = time.monotonic()

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, location: str | None = None) -> int:
        while True:
            try:
                if location is None:
                    location = self._start()
                if self.chunked:
                    self._chunked(location)
                else:
                    self._monolithic(location)
                return self.descriptor.size
            except RegistryError as e:
                if not (e.temporary or isinstance(e, _SessionLost)):
                    raise
                self._recover_or_raise(e)
                if self._arrived():
                    return self.descriptor.size
                self.restarts += 1
                location = None
                self._report(0)

    def _recover_or_raise(self, e: RegistryError) -> None:
        """Count a failed attempt; sleep before the next one, or raise ``e`` when the policy is exhausted."""
        policy = self.transport.retry
        wait = policy.backoff(self.attempts, e.retry_after)
        elapsed = time.monotonic() - self._started
        if self.attempts >= policy.attempts or elapsed + wait > policy.max_elapsed:
            annotate(e, f"gave up after {self.attempts} attempts in {elapsed:.1f}s")
            if isinstance(e, _SessionLost):
                raise RegistryError(e.message, **self.op.fields(self.transport.registry), status=e.status) from None
            raise e
        notify(e, self.attempts, wait)
        self.attempts += 1
        self.transport.sleep(wait)

    def _arrived(self) -> bool:
        try:
            return self.exists()
        except RegistryError:
            return False

    def _report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(done)

    # -- steps ----------------------------------------------------------------------------------------------
    def _start(self) -> str:
        resp = self.transport.request(
            "POST",
            f"/v2/{self.repository}/blobs/uploads/",
            op=self.op,
            scopes=self.scopes,
            headers={"Content-Length": "0"},
            ok=(202,),
        )
        return self._location(resp, None)

    def _location(self, resp: requests.Response, current: str | None) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            if current is None:
                raise RegistryProtocolError(
                    f"{self.op.describe(self.transport.registry)}: the registry opened an upload without a Location",
                    **self.op.fields(self.transport.registry),
                )
            return current
        return urljoin(resp.url, loc)

    def _send(self, method: str, location: str, *, ok: tuple[int, ...], **kwargs: object) -> requests.Response:
        """One upload request, not retried by the transport: recovery is decided here."""
        try:
            return self.transport.request(
                method, location, op=self.op, scopes=self.scopes, ok=ok, retry=False, **kwargs
            )
        except RegistryError as e:
            if e.status == 404 and method != "POST":
                raise _SessionLost(
                    f"{e.message} (the upload session is gone)",
                    **self.op.fields(self.transport.registry),
                    status=404,
                ) from None
            raise

    def _finish(self, location: str, body: object, length: int) -> None:
        self._send(
            "PUT",
            location,
            ok=(201, 204),
            params={"digest": self.descriptor.digest.value},
            headers={"Content-Type": _OCTET, "Content-Length": str(length)},
            body=body,
        )

    def _monolithic(self, location: str) -> None:
        if self.descriptor.size == 0:
            self._finish(location, b"", 0)
        else:
            with self.open_fn() as f:
                self._finish(location, f, self.descriptor.size)
        self._report(self.descriptor.size)

    def _status(self, location: str) -> tuple[str, int]:
        """Where the registry says this upload stands: (location to continue at, bytes committed)."""
        resp = self.transport.request("GET", location, op=self.op, scopes=self.scopes, ok=(200, 204, 404))
        if resp.status_code == 404:
            raise _SessionLost(
                f"{self.op.describe(self.transport.registry)}: the upload session is gone",
                **self.op.fields(self.transport.registry),
                status=404,
            )
        return self._location(resp, location), self._committed(resp, 0)

    @staticmethod
    def _committed(resp: requests.Response, fallback: int) -> int:
        header = resp.headers.get("Range")
        if header is None:
            return fallback
        m = _RANGE.match(header.strip())
        if m is None:
            return fallback
        end = int(m.group(1))
        # distribution answers "0-0" for an empty upload as well as for one byte; chunks are never one byte.
        return 0 if end == 0 else end + 1

    def _chunked(self, location: str) -> None:
        size = self.descriptor.size
        offset = 0
        with self.open_fn() as f:
            while True:
                try:
                    if offset < size:
                        location, offset = self._patch(f, location, offset)
                        continue
                    self._finish(location, b"", 0)
                    return
                except _SessionLost:
                    if offset >= size and self._arrived():  # the PUT went through but its answer was lost
                        return
                    raise
                except RegistryError as e:
                    if not (e.temporary or e.status == 416):
                        raise
                    self._recover_or_raise(e)
                    if offset >= size and self._arrived():
                        return
                    self.resumes += 1
                    location, offset = self._status(location)
                    self._report(offset)

    def _patch(self, f: IO[bytes], location: str, offset: int) -> tuple[str, int]:
        """Send the chunk at ``offset``; returns (next location, bytes the registry now holds)."""
        size = self.descriptor.size
        f.seek(offset)
        data = f.read(min(self.chunk_size, size - offset))
        if not data:
            raise RegistryProtocolError(
                f"{self.op.describe(self.transport.registry)}: the local blob ended at {offset} of {size} bytes",
                **self.op.fields(self.transport.registry),
            )
        resp = self._send(
            "PATCH",
            location,
            ok=(202, 204),
            headers={
                "Content-Type": _OCTET,
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
                "Content-Length": str(len(data)),
            },
            body=data,
        )
        committed = self._committed(resp, offset + len(data))
        self._report(committed)
        return self._location(resp, location), committed
