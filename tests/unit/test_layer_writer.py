"""LayerWriter: deterministic bytes, BuildKit-style headers, whiteouts, PAX only where needed, verified digests."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from imgci.build.fs import FileInfo, LayerEntry
from imgci.build.layer import HashSink, LayerResult, plan_entries, write_layer, write_tar
from imgci.build.tarwriter import BLOCK, TarRecord, encode_header
from imgci.compression import open_decompressed
from imgci.errors import BuildError
from imgci.layerfs import apply_layer
from imgci.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD
from imgci.store import Store
from imgci.tarstream import TarReader


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def f(path: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> LayerEntry:
    return LayerEntry(FileInfo(path, "file", mode, size=len(data), **kw), data=data)  # type: ignore[arg-type]


def d(path: str, mode: int = 0o755, **kw: object) -> LayerEntry:
    return LayerEntry(FileInfo(path, "dir", mode, **kw))  # type: ignore[arg-type]


def sym(path: str, target: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "symlink", 0o777, linkname=target))


def hl(path: str, target: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "hardlink", 0o644, linkname=target))


def wh(path: str) -> LayerEntry:
    return LayerEntry(FileInfo(path, "file", 0), whiteout=True)


def raw_tar(store: Store, result: LayerResult) -> bytes:
    with store.open_blob(result.descriptor.digest) as blob:
        return open_decompressed(blob).read()


def members(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


SAMPLE = [
    d("app", mtime=100),
    f("app/a.txt", b"alpha", uid=1000, gid=1000, mtime=200.75),
    f("app/big.bin", os.urandom(3 << 20), 0o755),
    sym("app/link", "a.txt"),
    hl("app/hard", "app/a.txt"),
    d("app/sub", 0o700),
    f("app/sub/x", b"x" * 700),
    LayerEntry(FileInfo("dev-null", "char", 0o666, devmajor=1, devminor=3)),
    LayerEntry(FileInfo("pipe", "fifo", 0o600)),
    wh("old"),
]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_identical_input_gives_a_byte_identical_blob(store: Store, compression: str) -> None:
    shuffled = SAMPLE[:]
    random.Random(7).shuffle(shuffled)
    one = write_layer(store, SAMPLE, compression=compression, source_date_epoch=150)
    two = write_layer(store, shuffled, compression=compression, source_date_epoch=150, threaded=False)
    assert one == two
    other = write_layer(store, SAMPLE, compression=compression, source_date_epoch=151)  # app/a.txt clamps
    assert other.diff_id != one.diff_id


@pytest.mark.parametrize(
    ("compression", "media_type"), [("gzip", OCI_LAYER_GZIP), ("zstd", OCI_LAYER_ZSTD), ("none", OCI_LAYER)]
)
def test_digest_size_diff_id_and_media_type_are_those_of_the_stored_bytes(
    store: Store, compression: str, media_type: str
) -> None:
    result = write_layer(store, SAMPLE, compression=compression)
    assert result.descriptor.media_type == media_type
    blob = store.read_blob(result.descriptor.digest)
    assert len(blob) == result.descriptor.size
    assert hashlib.sha256(blob).hexdigest() == result.descriptor.digest.hex
    raw = raw_tar(store, result)
    assert len(raw) == result.uncompressed_size
    assert hashlib.sha256(raw).hexdigest() == result.diff_id.hex
    assert result.entry_count == len(SAMPLE) == len(members(raw))
    assert len(raw) % BLOCK == 0 and raw.endswith(bytes(2 * BLOCK))
    assert store.fsck() == []


def test_source_date_epoch_clamps_only_newer_mtimes_and_truncates_to_seconds(store: Store) -> None:
    entries = [f("old", b"1", mtime=500.9), f("new", b"2", mtime=5000.5), f("same", b"3", mtime=1000)]
    by_name = {m.name: m.mtime for m in members(raw_tar(store, write_layer(store, entries, source_date_epoch=1000)))}
    assert by_name == {"old": 500, "new": 1000, "same": 1000}
    unclamped = {m.name: m.mtime for m in members(raw_tar(store, write_layer(store, entries)))}
    assert unclamped == {"old": 500, "new": 5000, "same": 1000}


def test_entries_are_sorted_component_wise_with_markers_first_in_their_directory(store: Store) -> None:
    entries = [
        f("a-b"),
        f("a/z"),
        d("a"),
        f("a/-dash"),
        wh("a/-dash"),  # same name: the whiteout must come first
        wh("a/b"),
        LayerEntry(FileInfo("a/c", "dir", 0o755), opaque=True),
        f("a/c/in"),
        f("a/.hidden"),
        d("B"),
    ]
    names = [m.name for m in members(raw_tar(store, write_layer(store, entries)))]
    assert names == [
        "B",
        "a",
        "a/.wh.-dash",
        "a/.wh.b",
        "a/-dash",
        "a/.hidden",
        "a/c",
        "a/c/.wh..wh..opq",
        "a/c/in",
        "a/z",
        "a-b",
    ]


def test_whiteouts_are_written_as_containerd_and_opaque_markers_as_docker(store: Store) -> None:
    entries = [d("etc", mode=0o750, uid=5, gid=6, mtime=77), wh("etc/gone"), LayerEntry(d("etc").info, opaque=True)]
    with pytest.raises(ValueError, match="duplicate"):
        write_layer(store, entries)
    entries = [LayerEntry(FileInfo("etc", "dir", 0o750, 5, 6, mtime=77), opaque=True), wh("etc/gone")]
    raw = raw_tar(store, write_layer(store, entries, source_date_epoch=50))
    by_name = {m.name: m for m in members(raw)}
    gone, opq = by_name["etc/.wh.gone"], by_name["etc/.wh..wh..opq"]
    assert (gone.type, gone.mode, gone.uid, gone.gid, gone.size, gone.mtime) == (tarfile.REGTYPE, 0, 0, 0, 0, 0)
    assert (opq.type, opq.mode, opq.uid, opq.gid, opq.size, opq.mtime) == (tarfile.REGTYPE, 0o750, 5, 6, 0, 0)
    assert by_name["etc"].mtime == 50
    assert b"PaxHeaders" not in raw  # plain ustar headers


def test_written_whiteouts_are_applied_by_apply_layer(store: Store, tmp_path: Path) -> None:
    lower = [d("keep"), f("keep/a", b"a"), d("gone"), f("gone/x"), f("file"), d("opq"), f("opq/lower", b"l")]
    upper = [wh("gone"), wh("file"), LayerEntry(d("opq").info, opaque=True), f("opq/upper", b"u"), f("keep/b")]
    target = tmp_path / "root"
    target.mkdir()
    for entries in (lower, upper):
        apply_layer(io.BytesIO(raw_tar(store, write_layer(store, entries))), target)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert found == ["keep", "keep/a", "keep/b", "opq", "opq/upper"]


def test_python_tarfile_reads_every_header_kind(store: Store) -> None:
    long_dir = "d" * 120
    entries = [
        d(long_dir),
        f(f"{long_dir}/file", b"content", uid=3_000_000, gid=7),
        f("caf\u00e9.txt", b"x"),
        f("bad-\udcff-name", b"y"),
        sym("long-link", "t" * 150),
        LayerEntry(FileInfo("cap", "file", 0o755, size=1, xattrs=(("security.capability", b"\x01\x00"),)), data=b"c"),
        f("huge-mtime", mtime=2**40),
    ]
    raw = raw_tar(store, write_layer(store, entries))
    with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape") as tar:
        by_name = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile(f"{long_dir}/file").read() == b"content"  # type: ignore[union-attr]
    assert by_name[long_dir].isdir()
    assert by_name[f"{long_dir}/file"].uid == 3_000_000 and by_name[f"{long_dir}/file"].gid == 7
    assert "caf\u00e9.txt" in by_name and "bad-\udcff-name" in by_name
    assert by_name["long-link"].linkname == "t" * 150
    assert by_name["cap"].pax_headers["SCHILY.xattr.security.capability"] == "\x01\x00"
    assert by_name["huge-mtime"].mtime == 2**40
    assert all(m.uname == "" and m.gname == "" for m in by_name.values())
    # imgci's own reader agrees (xattrs come back as bytes)
    names = {e.name: e for e in TarReader(io.BytesIO(raw))}
    assert names[f"{long_dir}/"].is_dir and names["cap"].xattrs == {"security.capability": b"\x01\x00"}


def test_header_is_ustar_unless_a_value_does_not_fit() -> None:
    plain = encode_header(TarRecord("dir/", b"5", 0o755, 1, 2, 0, 1234))
    assert len(plain) == BLOCK
    assert plain[:5] == b"dir/\0" and plain[257:265] == b"ustar\x0000"
    assert plain[100:108] == b"0000755\0" and plain[108:116] == b"0000001\0" and plain[136:148] == b"00000002322\0"
    assert plain[265:329] == bytes(64)  # empty uname/gname
    assert plain[329:345] == b"0000000\x000000000\x00"  # device numbers always written, as Go does
    checksum = sum(plain[:148]) + 8 * 32 + sum(plain[156:])
    assert plain[148:156] == b"%06o\0 " % checksum
    assert len(encode_header(TarRecord("n" * 100, b"0"))) == BLOCK  # 100 bytes fit without a terminator
    for rec, key in [
        (TarRecord("n" * 101, b"0"), b"path="),
        (TarRecord("\u00e9", b"0"), b"path="),
        (TarRecord("l", b"2", linkname="t" * 101), b"linkpath="),
        (TarRecord("u", b"0", uid=8**7), b"uid=2097152"),
        (TarRecord("g", b"0", gid=8**7), b"gid=2097152"),
        (TarRecord("m", b"0", mtime=-1), b"mtime=-1"),
        (TarRecord("x", b"0", xattrs=(("user.k", b"v"),)), b"SCHILY.xattr.user.k=v"),
    ]:
        out = encode_header(rec)
        assert len(out) == 3 * BLOCK and out[156:157] == b"x" and key in out[BLOCK : 2 * BLOCK], rec
    assert encode_header(TarRecord("a/b", b"0", uid=8**7))[:17] == b"a/PaxHeaders.0/b\0"
    assert len(encode_header(TarRecord("s", b"0", size=8**11))) == 3 * BLOCK


def test_hardlink_content_goes_to_the_member_that_sorts_first(store: Store, tmp_path: Path) -> None:
    entries = [f("z/target", b"shared", uid=9), hl("a/link", "z/target"), hl("m/link2", "a/link"), d("a"), d("z")]
    raw = raw_tar(store, write_layer(store, entries))
    by_name = {m.name: m for m in members(raw)}
    assert by_name["a/link"].isreg() and by_name["a/link"].size == 6 and by_name["a/link"].uid == 9
    assert by_name["z/target"].islnk() and by_name["z/target"].linkname == "a/link"
    assert by_name["m/link2"].islnk() and by_name["m/link2"].linkname == "a/link"
    target = tmp_path / "root"
    target.mkdir()
    apply_layer(io.BytesIO(raw), target)
    assert (target / "z/target").read_bytes() == b"shared"
    inodes = {os.stat(target / p).st_ino for p in ("z/target", "a/link", "m/link2")}
    assert len(inodes) == 1
    outside = raw_tar(store, write_layer(store, [hl("x", "lower/file")]))  # target in a lower layer: as given
    assert members(outside)[0].linkname == "lower/file"


def test_caller_and_user_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        write_layer(store, [f("a"), f("./a")])
    with pytest.raises(ValueError, match="clean relative"):
        write_layer(store, [f("../a")])
    with pytest.raises(ValueError, match="opaque"):
        write_layer(store, [LayerEntry(f("a").info, opaque=True)])
    with pytest.raises(BuildError, match="mark deletions"):
        write_layer(store, [f("dir/.wh.sneaky")])
    with pytest.raises(BuildError, match="directory"):
        write_layer(store, [d("dir"), hl("link", "dir")])
    for bad in (sym("s", ""), hl("h", "/")):
        with pytest.raises(ValueError, match="has no target"):
            write_layer(store, [bad])
    src = tmp_path / "src"
    src.write_bytes(b"12345")
    for size, message in [(4, "grew"), (9, "shrank")]:
        entry = LayerEntry(FileInfo("f", "file", 0o644, size=size), host_path=src)
        with pytest.raises(BuildError, match=message):
            write_layer(store, [entry])
    with pytest.raises(BuildError, match="cannot read"):
        write_layer(store, [LayerEntry(FileInfo("f", "file", 0o644, size=1), host_path=tmp_path / "missing")])
    assert list(store.ingest_dir.iterdir()) == []  # nothing half-written left behind
    assert [m.name for m in members(raw_tar(store, write_layer(store, [d(""), d("/x/")])))] == ["x"]


class _FakeFS:
    """A SourceFS stand-in whose ``open`` returns a plain (non-readinto) stream."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def describe(self) -> str:
        return "fake"

    def open(self, path: str) -> IO[bytes]:
        class Plain:
            def __init__(self, data: bytes) -> None:
                self._b = io.BytesIO(data)

            def read(self, n: int = -1) -> bytes:
                return self._b.read(min(n, 1000) if n > 0 else n)  # short reads on purpose

            def __enter__(self) -> Plain:
                return self

            def __exit__(self, *a: object) -> None:
                pass

        return Plain(self.files[path])  # type: ignore[return-value]


def test_content_sources_data_host_path_and_source_fs_give_the_same_layer(store: Store, tmp_path: Path) -> None:
    content = os.urandom(2_500_000)
    (tmp_path / "c").write_bytes(content)
    info = FileInfo("c", "file", 0o644, size=len(content))
    fake = _FakeFS({"src/c": content})
    results = {
        write_layer(store, [LayerEntry(info, data=content)]).diff_id,
        write_layer(store, [LayerEntry(info, host_path=tmp_path / "c")]).diff_id,
        write_layer(store, [LayerEntry(info, source_fs=fake, source_path="src/c")]).diff_id,  # type: ignore[arg-type]
    }
    assert len(results) == 1


def test_tee_sees_exactly_the_uncompressed_stream(store: Store) -> None:
    tee = HashSink()
    result = write_layer(store, SAMPLE, tee=tee)
    assert tee.digest == result.diff_id
    sink = HashSink()
    write_tar(plan_entries(SAMPLE), sink)
    assert sink.digest == result.diff_id


def test_many_small_files_stream_through_without_trouble(store: Store) -> None:
    rng = random.Random(3)
    entries = [d(f"d{i}") for i in range(40)]
    entries += [f(f"d{i % 40}/f{i}", rng.randbytes(rng.randint(0, 9000))) for i in range(4000)]
    result = write_layer(store, entries)
    assert result.entry_count == 4040
    raw = raw_tar(store, result)
    assert sum(1 for _ in TarReader(io.BytesIO(raw))) == 4040
