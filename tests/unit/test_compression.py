"""compression: detection, decompression of every format, truncation/corruption errors, CompressingWriter."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
from collections.abc import Callable

import pytest
import zstandard

from imgci.compression import (
    CompressingWriter,
    HashingReader,
    detect,
    layer_media_type,
    open_decompressed,
)
from imgci.errors import CorruptArchiveError, UsageError
from imgci.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Digest

DATA = os.urandom(20_000) + b"imgci layer " * 20_000  # ~260 kB: incompressible head, compressible tail


def _zstd(data: bytes, **kw: object) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(data)  # type: ignore[arg-type]


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "zstd": _zstd,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "none": lambda d: d,
}


def _read(blob: bytes, chunk: int = 7919) -> bytes:
    reader = open_decompressed(io.BytesIO(blob))
    out = bytearray()
    while piece := reader.read(chunk):
        out += piece
    return bytes(out)


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_detect_and_round_trip(kind: str) -> None:
    blob = COMPRESSORS[kind](DATA)
    assert detect(blob[:6]) == kind
    assert _read(blob) == DATA


def test_detect_needs_real_magic() -> None:
    assert detect(b"") == "none"
    assert detect(b"\x1f") == "none"
    assert detect(b"BZh0") == "none"  # block size digit 0 is not bzip2
    assert detect(b"ustar") == "none"


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_concatenated_streams_are_read_whole(kind: str) -> None:
    blob = COMPRESSORS[kind](DATA[:1000]) + COMPRESSORS[kind](DATA[1000:])
    assert _read(blob) == DATA


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
@pytest.mark.parametrize("keep", [0.5, 0.9, -1])
def test_truncated_input_is_corrupt_archive_error(kind: str, keep: float) -> None:
    blob = COMPRESSORS[kind](DATA)
    cut = len(blob) - 1 if keep == -1 else int(len(blob) * keep)
    with pytest.raises(CorruptArchiveError, match=r"truncated|corrupt"):
        _read(blob[:cut])


def test_zstd_truncation_is_detected_at_every_cut() -> None:
    # zstandard's stream reader ends quietly on a truncated frame; the frame tracker must notice every cut.
    blob = _zstd(DATA[:30_000], write_checksum=True) + _zstd(DATA[30_000:60_000])
    for cut in [*range(4, 40), *range(40, len(blob), 211), len(blob) - 1]:
        if cut == len(_zstd(DATA[:30_000], write_checksum=True)):
            continue  # a frame boundary: a complete stream
        with pytest.raises(CorruptArchiveError):
            _read(blob[:cut])


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_corrupt_input_is_corrupt_archive_error(kind: str) -> None:
    blob = bytearray(COMPRESSORS[kind](DATA))
    # Clobber the middle (and, for zstd, write a checksum so damage to literals is caught too).
    if kind == "zstd":
        blob = bytearray(_zstd(DATA, write_checksum=True))
    mid = len(blob) // 2
    blob[mid : mid + 64] = bytes(64)
    blob[12:20] = b"\xff" * 8
    with pytest.raises(CorruptArchiveError):
        _read(bytes(blob))


def test_gzip_crc_mismatch_is_detected() -> None:
    blob = bytearray(gzip.compress(DATA, mtime=0))
    blob[-8] ^= 0xFF  # CRC32 in the trailer
    with pytest.raises(CorruptArchiveError):
        _read(bytes(blob))


def test_errors_from_the_underlying_file_pass_through() -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            self.calls += 1
            if self.calls > 1:
                raise PermissionError(13, "disk says no")
            data = gzip.compress(DATA, mtime=0)[:100]
            b[: len(data)] = data
            return len(data)

    with pytest.raises(PermissionError, match="disk says no"):
        open_decompressed(Failing()).read()


def test_non_seekable_short_reads() -> None:
    """A pipe-like source that returns one byte at a time (head detection must loop)."""

    class Trickle:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read(self, n: int = -1) -> bytes:
            chunk, self.data = self.data[:1], self.data[1:]
            return chunk

    assert open_decompressed(Trickle(gzip.compress(b"hello", mtime=0))).read() == b"hello"


def test_explicit_compression_overrides_detection() -> None:
    raw = gzip.compress(b"x", mtime=0)
    assert open_decompressed(io.BytesIO(raw), "none").read() == raw


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compressing_writer_digests_in_one_pass(kind: str) -> None:
    sink = io.BytesIO()
    with CompressingWriter(sink, kind) as w:
        for i in range(0, len(DATA), 65_536):
            w.write(DATA[i : i + 65_536])
    result = w.finish()
    out = sink.getvalue()
    assert result.diff_id == Digest("sha256:" + hashlib.sha256(DATA).hexdigest())
    assert result.digest == Digest.of(out)
    assert result.size == len(out)
    assert result.uncompressed_size == len(DATA)
    assert _read(out) == DATA
    assert result.media_type == layer_media_type(kind)
    if kind == "none":
        assert result.digest == result.diff_id
    else:
        assert detect(out[:6]) == kind and len(out) < len(DATA)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compressing_writer_output_does_not_depend_on_write_sizes(kind: str) -> None:
    # ISA-L's raw output does depend on how input is split between compress() calls; the writer re-blocks.
    data = DATA * 9  # > 2 MiB: several compressor blocks

    def once(step: int) -> bytes:
        sink = io.BytesIO()
        w = CompressingWriter(sink, kind)
        for i in range(0, len(data), step):
            w.write(data[i : i + step])
        w.finish()
        return sink.getvalue()

    whole = once(len(data))
    assert once(512) == whole
    assert once(10_240) == whole
    assert once((1 << 20) + 7) == whole
    assert _read(whole) == data


def test_compressing_writer_empty_input_and_levels() -> None:
    sink = io.BytesIO()
    result = CompressingWriter(sink, "gzip", level=3).finish()
    assert _read(sink.getvalue()) == b""
    assert result.diff_id == Digest("sha256:" + hashlib.sha256(b"").hexdigest())
    with pytest.raises(UsageError):
        CompressingWriter(io.BytesIO(), "bzip2")
    w = CompressingWriter(io.BytesIO(), "gzip")
    w.finish()
    with pytest.raises(ValueError):
        w.write(b"late")


def test_layer_media_types() -> None:
    assert layer_media_type("gzip") == OCI_LAYER_GZIP
    assert layer_media_type("zstd") == OCI_LAYER_ZSTD
    assert layer_media_type("none") == OCI_LAYER
    with pytest.raises(UsageError):
        layer_media_type("lz4")


def test_hashing_reader() -> None:
    r = HashingReader(io.BytesIO(DATA))
    assert r.read(10) == DATA[:10]
    r.drain()
    assert r.size == len(DATA)
    assert r.digest == Digest("sha256:" + hashlib.sha256(DATA).hexdigest())
