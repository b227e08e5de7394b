"""Layer compression: detect it, read through it, write through it.

Contract:
- ``detect(head)`` names the compression of a stream from its first bytes (magic numbers only).
- ``open_decompressed(fileobj)`` returns a readable stream of the decompressed bytes of any supported format.
  Corrupt or truncated input raises :class:`CorruptArchiveError` — never a raw zlib/EOFError/zstd error — and
  the underlying file's own ``OSError`` passes through unchanged. Memory stays bounded by the read size.
- ``CompressingWriter`` takes uncompressed bytes, writes compressed bytes to a sink, and computes the
  uncompressed sha256 (the layer's diff_id) and the compressed sha256 + size in the same pass.

gzip goes through ISA-L (``isal``), zstd through ``zstandard``, bzip2/xz through the stdlib.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import io
import lzma
from dataclasses import dataclass
from typing import IO, Any, Literal, Protocol, cast

import zstandard
from isal import igzip, isal_zlib

from imgci.errors import CorruptArchiveError, UsageError
from imgci.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Digest

Compression = Literal["gzip", "zstd", "bzip2", "xz", "none"]
WRITABLE: tuple[str, ...] = ("gzip", "zstd", "none")
DEFAULT_LEVELS = {"gzip": 1, "zstd": 3}  # isal levels are 0-3; 1 is fast with a decent ratio
_CHUNK = 1 << 20
_COMPRESS_BLOCK = 1 << 20  # part of the output format: changing it changes every layer digest imgci makes


class Readable(Protocol):
    """Anything with ``read(n) -> bytes`` (files, pipes, decompressors, HashingReader, TarReader)."""

    def read(self, n: int = ..., /) -> bytes: ...


class Sink(Protocol):
    """Anything with ``write(bytes)`` (files, BlobWriter, CompressingWriter)."""

    def write(self, data: bytes, /) -> Any: ...


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_HEAD = 6  # enough bytes for every magic above


def detect(head: bytes) -> Compression:
    """The compression of a stream whose first bytes are ``head`` (pass at least 6 bytes when available)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC) or (len(head) >= 4 and int.from_bytes(head[:4], "little") >> 4 == 0x184D2A5):
        return "zstd"  # a frame, or a skippable frame (which zstd readers accept before the first frame)
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if len(head) >= 4 and head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0":
        return "bzip2"
    return "none"


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for a layer written with ``compression`` (gzip, zstd or none)."""
    try:
        return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}[compression]
    except KeyError:
        raise UsageError(f"unsupported layer compression {compression!r} (use gzip, zstd or none)") from None


class _SourceError(Exception):
    """Carries an exception raised by the underlying file through a decompression library unchanged."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _Source(io.RawIOBase):
    """The compressed input: the already-read ``head`` followed by the rest of ``fileobj``.

    Exceptions from ``fileobj`` are wrapped in ``_SourceError`` so that they cannot be mistaken for corruption.
    """

    def __init__(self, head: bytes, fileobj: Readable, tracker: _ZstdFrameTracker | None = None) -> None:
        self._head = head
        self._file = fileobj
        self._tracker = tracker

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
        else:
            try:
                data = self._file.read(len(view))
            except Exception as e:
                raise _SourceError(e) from e
            n = len(data)
            view[:n] = data
        if self._tracker is not None and n:
            self._tracker.feed(view[:n])
        return n


class _ZstdFrameTracker:
    """Follows the frame and block structure of a zstd stream (RFC 8878) without decoding it.

    ``zstandard``'s stream reader ends quietly when its input stops mid-frame; this tells a stream that ended on
    a frame boundary (``complete``) from a truncated one, using only headers and sizes.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "magic"
        self._skip = 0
        self._after_skip = "magic"
        self._checksum = False
        self._fhrest = 0
        self.frames = 0

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._buf and not self._skip

    def _need(self) -> int:
        if self._state == "fhd":
            return 1
        if self._state == "block":
            return 3
        if self._state == "fhrest":
            return self._fhrest
        return 4  # magic, skipsize

    def feed(self, data: memoryview) -> None:
        i = 0
        while i < len(data):
            if self._skip:
                n = min(self._skip, len(data) - i)
                self._skip -= n
                i += n
                if not self._skip:
                    self._state = self._after_skip
                continue
            take = min(self._need() - len(self._buf), len(data) - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._need():
                self._parse(bytes(self._buf))
                self._buf.clear()

    def _skip_then(self, n: int, state: str) -> None:
        self._skip, self._after_skip = n, state
        if not n:
            self._state = state

    def _parse(self, b: bytes) -> None:
        state = self._state
        if state == "magic":
            if b == _ZSTD_MAGIC:
                self._state = "fhd"
            elif int.from_bytes(b, "little") & 0xFFFFFFF0 == 0x184D2A50:
                self._state = "skipsize"
            else:
                self._state = "bad"  # not zstd: the decoder reports it; the tracker just stops following
        elif state == "skipsize":
            self.frames += 1
            self._skip_then(int.from_bytes(b, "little"), "magic")
        elif state == "fhd":
            fhd = b[0]
            single = (fhd >> 5) & 1
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            self._fhrest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs
            self._state = "fhrest" if self._fhrest else "block"
        elif state == "fhrest":
            self._state = "block"
        elif state == "block":
            header = int.from_bytes(b, "little")
            last, btype, size = header & 1, (header >> 1) & 3, header >> 3
            content = 1 if btype == 1 else size  # an RLE block stores its byte once
            if last:
                self.frames += 1
                self._skip_then(content, "checksum" if self._checksum else "magic")
            else:
                self._skip_then(content, "block")
        elif state == "checksum":
            self._state = "magic"


_ISAL_ERROR = cast("type[BaseException]", isal_zlib.error)  # isal's stubs type it as an instance
_CORRUPTION = (EOFError, OSError, ValueError, lzma.LZMAError, zstandard.ZstdError, _ISAL_ERROR)


class DecompressedReader(io.RawIOBase):
    """A readable stream of decompressed bytes; see :func:`open_decompressed`."""

    def __init__(self, fileobj: Readable, compression: Compression, head: bytes) -> None:
        self.compression = compression
        self._tracker = _ZstdFrameTracker() if compression == "zstd" else None
        self._source = _Source(head, fileobj, self._tracker)
        self._inner: Any
        source = cast(IO[bytes], self._source)
        if compression == "gzip":
            self._inner = igzip.IGzipFile(fileobj=self._source, mode="rb")
        elif compression == "zstd":
            dctx = zstandard.ZstdDecompressor()
            self._inner = dctx.stream_reader(source, read_size=1 << 17, read_across_frames=True, closefd=False)
        elif compression == "bzip2":
            self._inner = bz2.BZ2File(self._source, "rb")
        elif compression == "xz":
            self._inner = lzma.LZMAFile(source, "rb")  # noqa: SIM115 - closed in close()
        else:
            self._inner = self._source
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._eof:
            return 0
        view = memoryview(b).cast("B")
        try:
            data = self._inner.read(len(view))
        except _SourceError as e:
            raise e.original from None
        except _CORRUPTION as e:
            what = f"{self.compression} stream" if self.compression != "none" else "stream"
            if isinstance(e, EOFError):
                raise CorruptArchiveError(f"truncated {what}: {e}") from None
            raise CorruptArchiveError(f"corrupt {what}: {e}") from None
        if not data and len(view):
            self._eof = True
            if self._tracker is not None and not self._tracker.complete:
                raise CorruptArchiveError("truncated zstd stream: input ended inside a frame")
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._inner is not self._source:
            with contextlib.suppress(_SourceError, *_CORRUPTION):  # must not mask the error being raised
                self._inner.close()
        super().close()


def open_decompressed(fileobj: Readable, compression: Compression | None = None) -> io.BufferedReader:
    """A buffered readable stream of the decompressed content of ``fileobj`` (compression detected if None).

    Works on non-seekable streams; does not close ``fileobj``. See the module contract for errors.
    """
    head = b""
    while len(head) < _HEAD:
        chunk = fileobj.read(_HEAD - len(head))
        if not chunk:
            break
        head += chunk
    kind: Compression = detect(head) if compression is None else compression
    return io.BufferedReader(DecompressedReader(fileobj, kind, head), buffer_size=1 << 16)


@dataclass(frozen=True)
class LayerDigests:
    """What one pass of :class:`CompressingWriter` measured."""

    diff_id: Digest  # sha256 of the uncompressed bytes
    digest: Digest  # sha256 of the compressed bytes (== diff_id for "none")
    size: int  # compressed size
    uncompressed_size: int
    compression: str

    @property
    def media_type(self) -> str:
        return layer_media_type(self.compression)


class CompressingWriter:
    """Compresses what is written to it into ``sink``, hashing both sides in the same pass.

    Contract: ``write`` accepts uncompressed bytes; ``finish`` flushes the compressor, returns
    :class:`LayerDigests` and does not close ``sink``. Output is deterministic for a given input, compression
    and level — however the input is split into writes (the gzip header carries no name and mtime 0) — so
    equal inputs give equal layer digests.
    """

    def __init__(self, sink: Sink, compression: str = "gzip", level: int | None = None) -> None:
        if compression not in WRITABLE:
            raise UsageError(f"cannot write {compression!r} layers (use gzip, zstd or none)")
        self.compression = compression
        self._sink = sink
        self._raw_hash = hashlib.sha256()
        self._out_hash = hashlib.sha256()
        self._raw_size = 0
        self._out_size = 0
        self._result: LayerDigests | None = None
        self._pending = bytearray()
        lvl = DEFAULT_LEVELS.get(compression, 0) if level is None else level
        self._compressor: Any = None
        if compression == "gzip":
            self._compressor = isal_zlib.compressobj(lvl, isal_zlib.DEFLATED, 31)
        elif compression == "zstd":
            self._compressor = zstandard.ZstdCompressor(level=lvl).compressobj()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._result is not None:
            raise ValueError("write after finish")
        self._raw_hash.update(data)
        n = len(data)
        self._raw_size += n
        if self._compressor is None:
            self._emit(bytes(data))
            return n
        # ISA-L's output depends on how the input is split between compress() calls, so the input is re-cut
        # into fixed blocks: the layer digest then depends on the bytes only, never on the caller's writes.
        view = memoryview(data).cast("B")
        if self._pending:
            take = _COMPRESS_BLOCK - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < _COMPRESS_BLOCK:
                return n
            self._emit(self._compressor.compress(bytes(self._pending)))
            self._pending.clear()
        while len(view) >= _COMPRESS_BLOCK:
            self._emit(self._compressor.compress(view[:_COMPRESS_BLOCK]))
            view = view[_COMPRESS_BLOCK:]
        self._pending += view
        return n

    def _emit(self, out: bytes) -> None:
        if out:
            self._out_hash.update(out)
            self._out_size += len(out)
            self._sink.write(out)

    def finish(self) -> LayerDigests:
        """Flush and return the digests; idempotent."""
        if self._result is None:
            if self._compressor is not None:
                if self._pending:
                    self._emit(self._compressor.compress(bytes(self._pending)))
                    self._pending.clear()
                self._emit(self._compressor.flush())
            self._result = LayerDigests(
                diff_id=Digest("sha256:" + self._raw_hash.hexdigest()),
                digest=Digest("sha256:" + self._out_hash.hexdigest()),
                size=self._out_size,
                uncompressed_size=self._raw_size,
                compression=self.compression,
            )
        return self._result

    def __enter__(self) -> CompressingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.finish()


class HashingReader:
    """Reads through ``fileobj`` while hashing (``algorithm``, sha256 by default) and counting what passed."""

    def __init__(self, fileobj: Readable, algorithm: str = "sha256") -> None:
        self._file = fileobj
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._file.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) everything left."""
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> Digest:
        return Digest(f"{self._hash.name}:{self._hash.hexdigest()}")
