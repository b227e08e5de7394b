"""The OCI distribution API for one registry: manifests, blobs, mounts, uploads, tags.

Contract:
- Every byte fetched is checked: a manifest against ``Docker-Content-Digest`` and against the digest it was
  asked for (and at most ``max_manifest_size`` bytes); a blob is streamed into a caller's writer (the Store's
  BlobWriter hashes and refuses a wrong digest or size on ``commit``) and its size is checked here.
- A blob download that breaks is resumed with ``Range`` from the bytes already written (if the server ignores the
  range, the bytes already written are skipped), within the retry policy.
- Uploads: see :mod:`imgci.registry.upload` (monolithic below ``chunk_threshold``, chunked and resumable above).
- Errors are RegistryError subclasses naming registry, repository and digest (see :mod:`.responses`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, NamedTuple, Protocol

from imgci.errors import DigestMismatchError, InvalidDigestError, RegistryProtocolError, RegistryUnreachableError
from imgci.oci import ALL_MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, Descriptor, Digest, detect_media_type
from imgci.reference import DOCKER_HUB, DOCKER_HUB_ENDPOINT, Reference
from imgci.registry.auth import TokenCache, repository_scope
from imgci.registry.credentials import Credentials
from imgci.registry.responses import Operation
from imgci.registry.retry import RetryPolicy
from imgci.registry.transport import Transport
from imgci.registry.upload import BlobUpload

if TYPE_CHECKING:
    import requests

MANIFEST_ACCEPT = ", ".join(
    [
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
DEFAULT_CHUNK_THRESHOLD = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
_READ_SIZE = 64 * 1024  # small enough that a broken connection loses little of what arrived
_MAX_TAG_PAGES = 1000
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

ProgressFn = Callable[[int], None]  # bytes of this blob transferred so far


class BlobSink(Protocol):
    """Where a downloaded blob goes (the Store's BlobWriter is one)."""

    def write(self, data: bytes, /) -> object: ...


class FetchedManifest(NamedTuple):
    """A manifest or index as the registry sent it; ``raw`` is exactly the bytes its ``digest`` covers."""

    raw: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class MountResult:
    """``mounted``: the blob is now in the repository. Otherwise ``location`` may hold an upload to continue."""

    mounted: bool
    location: str | None = None


class RegistryClient:
    """Talks to one registry (``docker.io`` or a host[:port]). Thread-safe; ``close`` when done.

    ``credentials`` None reads docker's config.json (and helpers) when the registry asks; ``Credentials()`` is
    anonymous. ``retry`` bounds every request and every upload; ``sleep`` is how it waits (tests pass a fake).
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        credentials: Credentials | Callable[[], Credentials | None] | None = None,
        retry: RetryPolicy | None = None,
        timeout: tuple[float, float] = (15.0, 120.0),
        token_cache: TokenCache | None = None,
        verify: str | bool | None = None,
        chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_manifest_size: int = MAX_MANIFEST_SIZE,
        endpoint: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.registry = registry
        self.transport = Transport(
            registry,
            endpoint=endpoint or (DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry),
            insecure=insecure,
            credentials=credentials,
            retry=retry,
            timeout=timeout,
            token_cache=token_cache,
            verify=verify,
            sleep=sleep,
        )
        self.chunk_threshold = chunk_threshold
        self.chunk_size = chunk_size
        self.max_manifest_size = max_manifest_size
        self._placed: set[tuple[str, str]] = set()
        self._placed_lock = threading.Lock()

    def close(self) -> None:
        self.transport.close()

    def placed(self, repository: str, digest: Digest) -> bool:
        """Whether this client has already put the blob into ``repository`` (uploaded, mounted, or found there)."""
        with self._placed_lock:
            return (repository, digest.value) in self._placed

    def note_placed(self, repository: str, digest: Digest) -> None:
        with self._placed_lock:
            self._placed.add((repository, digest.value))

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def scopes(repository: str, *, push: bool = False, mount_from: str | None = None) -> tuple[str, ...]:
        out = [repository_scope(repository, *(("pull", "push") if push else ("pull",)))]
        if mount_from and mount_from != repository:
            out.append(repository_scope(mount_from, "pull"))
        return tuple(out)

    def warm_up(self, repository: str, *, push: bool = False) -> None:
        """Best effort, ahead of the first real request (a build about to push): see :meth:`Transport.warm_up`."""
        self.transport.warm_up(self.scopes(repository, push=push))

    def ping(self) -> None:
        """Check that the registry answers and that the credentials are accepted (for ``imgci login``)."""
        op = Operation("log in to")
        self.transport.request("GET", "/v2/", op=op)

    # -- manifests ------------------------------------------------------------------------------------------
    def get_manifest(self, ref: Reference) -> FetchedManifest:
        """The manifest or index ``ref`` names, verified against ``Docker-Content-Digest`` and a pinned digest."""
        op = Operation(
            "pull manifest", ref.repository, digest=ref.digest.value if ref.digest else "", tag=ref.tag or ""
        )

        def read(resp: requests.Response) -> FetchedManifest:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_manifest_size:
                raise self._too_big(op)
            chunks: list[bytes] = []
            total = 0
            for chunk in resp.iter_content(64 * 1024):
                total += len(chunk)
                if total > self.max_manifest_size:
                    raise self._too_big(op)
                chunks.append(chunk)
            raw = b"".join(chunks)
            if declared and declared.isdigit() and int(declared) != len(raw):
                raise self._unreachable(op, f"manifest body ended after {len(raw)} of {declared} bytes")
            return self._verified_manifest(ref, op, raw, resp)

        return self.transport.call(
            "GET",
            f"/v2/{ref.repository}/manifests/{ref.identifier}",
            read,
            op=op,
            scopes=self.scopes(ref.repository),
            headers={"Accept": MANIFEST_ACCEPT},
        )

    def _verified_manifest(self, ref: Reference, op: Operation, raw: bytes, resp: requests.Response) -> FetchedManifest:
        header = resp.headers.get("Docker-Content-Digest", "").strip()
        checks: list[tuple[Digest, str]] = []
        if ref.digest is not None:
            checks.append((ref.digest, "requested"))
        if header:
            try:
                checks.append((Digest.parse(header), "Docker-Content-Digest"))
            except InvalidDigestError:
                raise RegistryProtocolError(
                    f"{op.describe(self.registry)}: invalid Docker-Content-Digest {header[:100]!r}",
                    **op.fields(self.registry),
                ) from None
        for expected, source in checks:
            h = expected.hasher()
            h.update(raw)
            actual = f"{expected.algorithm}:{h.hexdigest()}"
            if actual != expected.value:
                raise DigestMismatchError(
                    f"{op.describe(self.registry)}: manifest digest mismatch: {source} digest is {expected}, "
                    f"the content hashes to {actual}",
                    expected=expected.value,
                    actual=actual,
                )
        content_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        media_type = detect_media_type(raw, content_type if content_type in ALL_MANIFEST_TYPES else "")
        digest = ref.digest if ref.digest is not None and ref.digest.algorithm == "sha256" else Digest.of(raw)
        return FetchedManifest(raw, media_type, digest)

    def _too_big(self, op: Operation) -> RegistryProtocolError:
        return RegistryProtocolError(
            f"{op.describe(self.registry)}: manifest is larger than {self.max_manifest_size} bytes",
            **op.fields(self.registry),
        )

    def _unreachable(self, op: Operation, cause: str) -> RegistryUnreachableError:
        return RegistryUnreachableError(
            f"{op.describe(self.registry)}: {cause}", **op.fields(self.registry), temporary=True
        )

    def head_manifest(self, ref: Reference, *, push: bool = False) -> Descriptor | None:
        """The descriptor of what ``ref`` names (from HEAD), or None if the registry does not have it."""
        op = Operation(
            "check manifest", ref.repository, digest=ref.digest.value if ref.digest else "", tag=ref.tag or ""
        )
        resp = self.transport.request(
            "HEAD",
            f"/v2/{ref.repository}/manifests/{ref.identifier}",
            op=op,
            scopes=self.scopes(ref.repository, push=push),
            headers={"Accept": MANIFEST_ACCEPT},
            ok=(200, 404),
        )
        if resp.status_code == 404:
            return None
        header = resp.headers.get("Docker-Content-Digest", "")
        try:
            digest = Digest.parse(header) if header else ref.digest
        except InvalidDigestError:
            digest = ref.digest
        if digest is None:
            return None  # the registry did not say; callers fall back to GET
        size = int(resp.headers.get("Content-Length") or -1)
        media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        return Descriptor(media_type, digest, max(size, 0))

    def put_manifest(self, repository: str, tag_or_digest: str, raw: bytes, media_type: str) -> Digest:
        """Upload a manifest or index under a tag or its digest; returns its digest."""
        digest = Digest.of(raw)
        op = Operation("push manifest", repository, digest=digest.value)
        resp = self.transport.request(
            "PUT",
            f"/v2/{repository}/manifests/{tag_or_digest}",
            op=op,
            scopes=self.scopes(repository, push=True),
            headers={"Content-Type": media_type},
            body=raw,
            ok=(200, 201, 202),
        )
        echoed = resp.headers.get("Docker-Content-Digest", "").strip()
        if echoed.startswith("sha256:") and echoed != digest.value:
            raise RegistryProtocolError(
                f"{op.describe(self.registry)}: the registry stored the manifest as {echoed}",
                **op.fields(self.registry),
            )
        return digest

    # -- blobs ----------------------------------------------------------------------------------------------
    def blob_exists(self, repository: str, digest: Digest, *, push: bool = False) -> int | None:
        """The blob's size if ``repository`` has it (HEAD), else None."""
        op = Operation("check blob", repository, digest=digest.value)
        resp = self.transport.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            op=op,
            scopes=self.scopes(repository, push=push),
            ok=(200, 404),
        )
        if resp.status_code == 404:
            return None
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else 0

    def fetch_blob(
        self, repository: str, descriptor: Descriptor, writer: BlobSink, *, progress: ProgressFn | None = None
    ) -> int:
        """Stream the blob into ``writer``; returns the bytes written (== ``descriptor.size``).

        The caller verifies the digest (the Store's BlobWriter does on ``commit``); more bytes than declared raise
        DigestMismatchError, fewer are resumed with ``Range``.
        """
        digest, size = descriptor.digest, descriptor.size
        op = Operation("fetch blob", repository, digest=digest.value)
        written = 0

        def headers() -> dict[str, str]:
            return {"Range": f"bytes={written}-"} if written else {}

        def read(resp: requests.Response) -> int:
            nonlocal written
            skip = 0
            if written and resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != written:
                    raise RegistryProtocolError(
                        f"{op.describe(self.registry)}: asked for bytes from {written}, got range "
                        f"{resp.headers.get('Content-Range', '(none)')!r}",
                        **op.fields(self.registry),
                    )
            elif written:
                skip = written  # the server ignored Range: drop what we already have
            announced = _announced_size(resp)
            if announced is not None and announced != size:
                # A size the descriptor does not have is wrong content, not a broken connection: refuse it before
                # reading (as go-containerregistry does), instead of retrying with a Range past the blob's end.
                raise DigestMismatchError(
                    f"{op.describe(self.registry)}: the registry sends a blob of {announced} bytes, "
                    f"{'more' if announced > size else 'fewer'} than the declared {size} bytes",
                    expected=str(size),
                    actual=str(announced),
                )
            for chunk in resp.iter_content(_READ_SIZE):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if written + len(chunk) > size:
                    raise DigestMismatchError(
                        f"{op.describe(self.registry)}: the registry sent more than the declared {size} bytes",
                        expected=str(size),
                        actual=f">{size}",
                    )
                writer.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
            if written < size:
                raise self._unreachable(op, f"the connection closed after {written} of {size} bytes")
            return written

        return self.transport.call(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            read,
            op=op,
            scopes=self.scopes(repository),
            headers=headers,
            ok=(200, 206),
        )

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> MountResult:
        """Ask the registry to link a blob it holds in ``from_repository`` into ``repository`` (no bytes sent)."""
        op = Operation(f"mount blob from {from_repository} into", repository, digest=digest.value)
        resp = self.transport.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            op=op,
            scopes=self.scopes(repository, push=True, mount_from=from_repository),
            params={"mount": digest.value, "from": from_repository},
            headers={"Content-Length": "0"},
            ok=(201, 202),
        )
        if resp.status_code == 201:
            return MountResult(True)
        location = resp.headers.get("Location")
        return MountResult(False, self.transport.url(location) if location else None)

    def upload_blob(
        self,
        repository: str,
        descriptor: Descriptor,
        open_fn: Callable[[], IO[bytes]],
        *,
        progress: ProgressFn | None = None,
        location: str | None = None,
    ) -> int:
        """Upload a blob whose bytes ``open_fn()`` reads from the start; returns the bytes sent (== size).

        ``location`` continues an upload the registry already opened (a declined mount). Monolithic below
        ``chunk_threshold``, chunked above; broken uploads are resumed or restarted within the retry policy.
        """
        upload = BlobUpload(
            self.transport,
            repository,
            descriptor,
            open_fn,
            scopes=self.scopes(repository, push=True),
            chunked=descriptor.size > self.chunk_threshold,
            chunk_size=self.chunk_size,
            progress=progress,
            exists=lambda: self.blob_exists(repository, descriptor.digest, push=True) == descriptor.size,
        )
        return upload.run(location)

    # -- tags -----------------------------------------------------------------------------------------------
    def list_tags(self, repository: str, *, page_size: int = 1000) -> list[str]:
        """Every tag of ``repository``, following ``Link: <…>; rel="next"`` pagination."""
        op = Operation("list tags of", repository)
        tags: list[str] = []
        url: str | None = f"/v2/{repository}/tags/list?n={page_size}"
        for _ in range(_MAX_TAG_PAGES):
            if url is None:
                return tags
            resp = self.transport.request("GET", url, op=op, scopes=self.scopes(repository))
            try:
                doc = resp.json()
                page: Iterable[object] = doc.get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryProtocolError(
                    f"{op.describe(self.registry)}: tag list is not JSON", **op.fields(self.registry)
                ) from None
            tags.extend(str(t) for t in page)
            nxt = resp.links.get("next", {}).get("url")
            url = self.transport.url(nxt) if nxt else None
        raise RegistryProtocolError(
            f"{op.describe(self.registry)}: more than {_MAX_TAG_PAGES} pages of tags", **op.fields(self.registry)
        )


def _announced_size(resp: requests.Response) -> int | None:
    """The whole blob's size as the answer states it: a 206's ``Content-Range`` total, or a 200's
    ``Content-Length`` when no ``Content-Encoding`` changes what it counts; None when it does not say."""
    if resp.status_code == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        return int(m.group(3)) if m is not None and m.group(3) != "*" else None
    if resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    length = resp.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def _manifest_op(action: str, ref: Reference) -> Operation:
    return Operation(action, ref.repository, digest=ref.digest.value if ref.digest else "", tag=ref.tag or "")


class ClientPool:
    """A ``client_factory`` for :mod:`imgci.transfer`: one shared client per registry, with shared token cache.

    ``insecure_registries`` lists hosts that may use plain HTTP / unverified TLS; other keyword arguments are
    passed to every :class:`RegistryClient`.
    """

    def __init__(self, *, insecure_registries: Iterable[str] = (), **client_kwargs: object) -> None:
        self.insecure = frozenset(insecure_registries)
        self.client_kwargs = client_kwargs
        self.token_cache = TokenCache()
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def __call__(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                kwargs: dict[str, object] = {"token_cache": self.token_cache, **self.client_kwargs}
                client = RegistryClient(registry, insecure=registry in self.insecure, **kwargs)  # type: ignore[arg-type]
                self._clients[registry] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
