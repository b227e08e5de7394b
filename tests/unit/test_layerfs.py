"""layerfs: a breakout table for apply_layer, whiteout/opaque semantics, metadata, and unpack_image verification.

Every breakout case runs in a sandbox holding the target plus a canary file and a directory *outside* it; after
the case, nothing outside the target may differ (content, mode, mtime, link count) and nothing new may appear.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imgci.compression import CompressingWriter
from imgci.errors import ArchiveError, CorruptArchiveError, DigestMismatchError, UnsafeArchiveError
from imgci.layerfs import apply_layer, unpack_image
from imgci.oci import OCI_CONFIG, Descriptor, ImageConfig, Manifest
from imgci.store import Store
from imgci.tarstream import MAX_DEPTH, safe_parts
from tests.infra import rootfs as tb
from tests.infra.canary import outside_snapshot

ROOT = os.geteuid() == 0


@dataclass
class Sandbox:
    """``base/up1/up2/{target,outside/secret.txt,canary.txt}``: escapes up to three levels are all seen."""

    base: Path
    target: Path

    @property
    def outside(self) -> Path:
        return self.target.parent / "outside"

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Everything but the target (tests/infra/canary.py)."""
        return outside_snapshot(self.base, self.target)

    def apply(self, *layers: list[Any], unprivileged: bool | None = None) -> None:
        for entries in layers:
            apply_layer(io.BytesIO(tb.build_tar(entries)), self.target, unprivileged=unprivileged)


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    target = tmp_path / "up1" / "up2" / "target"
    target.mkdir(parents=True)
    (target.parent / "outside").mkdir()
    (target.parent / "outside" / "secret.txt").write_bytes(b"secret")
    (target.parent / "outside" / "secret.txt").chmod(0o600)
    (target.parent / "canary.txt").write_bytes(b"canary")
    (target.parent / "canary.txt").chmod(0o640)
    os.utime(target.parent / "canary.txt", (1_000_000, 1_000_000))
    return Sandbox(tmp_path, target)


OUT = "@OUTSIDE@"  # replaced by the sandbox's absolute outside path in symlink targets


def _sub(entries: list[Any], box: Sandbox) -> list[Any]:
    out = []
    for e in entries:
        if isinstance(e, tb.TarEntry) and OUT in e.linkname:
            e = tb.TarEntry(**{**e.__dict__, "linkname": e.linkname.replace(OUT, str(box.outside))})
        out.append(e)
    return out


def _raw(name: str, data: bytes = b"", **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = pax
    return info, data


# name, layers, expected error (None: must succeed), check on the target afterwards
BREAKOUTS: list[tuple[str, list[list[Any]], type[Exception] | None, Callable[[Path], bool] | None]] = [
    ("dotdot file", [[tb.file("../canary.txt", b"pwned")]], UnsafeArchiveError, None),
    ("dotdot inside path", [[tb.file("a/../../canary.txt", b"pwned")]], UnsafeArchiveError, None),
    ("dotdot dir", [[tb.directory("../outside", 0o777)]], UnsafeArchiveError, None),
    (
        "absolute name is confined",
        [[tb.file("/canary.txt", b"inside")]],
        None,
        lambda t: (t / "canary.txt").read_bytes() == b"inside",
    ),
    ("NUL in PAX path", [[_raw("x", b"y", path="ok\x00/../../canary.txt")]], UnsafeArchiveError, None),
    (
        "symlink parent escaping (relative)",
        [[tb.symlink("l", "../outside"), tb.file("l/secret.txt", b"pwned")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "symlink parent escaping (deep)",
        [[tb.directory("a"), tb.symlink("a/l", "../../.."), tb.file("a/l/x", b"p")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "symlink parent escaping across layers",
        [[tb.symlink("l", "../outside")], [tb.file("l/new", b"p")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "symlink chain escaping",
        [[tb.directory("d"), tb.symlink("d/up", ".."), tb.symlink("esc", "d/up/.."), tb.file("esc/canary.txt", b"p")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "symlink to / as parent",
        [[tb.symlink("l", "/"), tb.file("l/etc/x", b"inside")]],
        None,
        lambda t: (t / "etc" / "x").read_bytes() == b"inside",
    ),
    ("symlink loop", [[tb.symlink("a", "b"), tb.symlink("b", "a"), tb.file("a/x", b"p")]], UnsafeArchiveError, None),
    (
        "file over symlink replaces the link",
        [[tb.symlink("f", "../canary.txt")], [tb.file("f", b"new", 0o777)]],
        None,
        lambda t: not (t / "f").is_symlink() and (t / "f").read_bytes() == b"new",
    ),
    (
        "dir over symlink replaces the link",
        [[tb.symlink("d", "../outside")], [tb.directory("d", 0o777)]],
        None,
        lambda t: not (t / "d").is_symlink() and (t / "d").is_dir(),
    ),
    (
        "chmod via fifo/device over symlink",
        [[tb.symlink("p", "../canary.txt")], [tb.fifo("p", 0o777)]],
        None,
        lambda t: stat.S_ISFIFO((t / "p").lstat().st_mode),
    ),
    ("hardlink to outside (dotdot)", [[tb.hardlink("h", "../canary.txt")]], UnsafeArchiveError, None),
    ("hardlink to absolute host path", [[tb.hardlink("h", "/etc/passwd")]], CorruptArchiveError, None),
    ("hardlink through symlink", [[tb.symlink("l", OUT), tb.hardlink("h", "l/secret.txt")]], UnsafeArchiveError, None),
    (
        "hardlink through relative symlink",
        [[tb.symlink("l", "../outside"), tb.hardlink("h", "l/secret.txt")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "hardlink to symlink pointing outside links the link",
        [[tb.symlink("s", "../canary.txt"), tb.hardlink("h", "s")]],
        None,
        lambda t: os.readlink(t / "h") == "../canary.txt" and (t / "h").lstat().st_ino == (t / "s").lstat().st_ino,
    ),
    ("hardlink to directory", [[tb.directory("d"), tb.hardlink("h", "d")]], UnsafeArchiveError, None),
    ("hardlink to the root", [[tb.hardlink("h", "./")]], UnsafeArchiveError, None),
    ("whiteout of ..", [[tb.file(".wh..."), tb.file("x")]], UnsafeArchiveError, None),
    ("whiteout of . ", [[tb.directory("d"), tb.file("d/.wh..")]], UnsafeArchiveError, None),
    ("whiteout of the root", [[tb.file(".wh.")]], UnsafeArchiveError, None),
    (
        "whiteout through escaping symlink",
        [[tb.symlink("l", "../outside")], [tb.file("l/.wh.secret.txt")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "opaque through escaping symlink",
        [[tb.symlink("l", "../outside")], [tb.file("l/.wh..wh..opq")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "whiteout of a symlink removes the link",
        [[tb.symlink("s", OUT)], [tb.file(".wh.s")]],
        None,
        lambda t: not os.path.lexists(t / "s"),
    ),
    (
        "whiteout of a dir symlink removes the link",
        [[tb.symlink("s", "../outside")], [tb.file(".wh.s")]],
        None,
        lambda t: not os.path.lexists(t / "s"),
    ),
    ("symlink named .", [[tb.symlink(".", "../outside")]], UnsafeArchiveError, None),
    ("symlink named /", [[tb.symlink("/", "/tmp")]], UnsafeArchiveError, None),
    ("file named .", [[tb.file("./", b"x")]], UnsafeArchiveError, None),
    ("too deep", [[tb.file("a/" * (MAX_DEPTH + 1) + "f")]], UnsafeArchiveError, None),
    ("truncated with huge size", [[tb.file("big", b"abc", size=1 << 40)]], CorruptArchiveError, None),
    ("parent is a regular file", [[tb.file("f", b"x"), tb.file("f/x", b"y")]], ArchiveError, None),
    # files one after another in one directory reuse its fd: an entry that replaces that directory must end it
    (
        "a file replaces the directory the files before went into",
        [[tb.file("a/b/x", b"1"), tb.file("a/b", b"now a file"), tb.file("a/b/y", b"2")]],
        ArchiveError,
        None,
    ),
    (
        "a symlink replaces the directory the files before went into",
        [[tb.file("a/x", b"1"), tb.symlink("a", "../outside"), tb.file("a/y", b"2")]],
        UnsafeArchiveError,
        None,
    ),
    (
        "a file replaces the symlink its directory was reached through",
        [[tb.symlink("l", "."), tb.file("l/x", b"1"), tb.file("l/l", b"file"), tb.file("l/y", b"2")]],
        ArchiveError,
        None,
    ),
    (
        "files of one directory, a whiteout, then more",
        [[tb.directory("d"), tb.file("d/x", b"1"), tb.file("d/y", b"2")], [tb.file("d/.wh.x"), tb.file("d/z", b"3")]],
        None,
        lambda t: sorted(os.listdir(t / "d")) == ["y", "z"],
    ),
]


@pytest.mark.parametrize(("layers", "error", "check"), [c[1:] for c in BREAKOUTS], ids=[c[0] for c in BREAKOUTS])
def test_breakout_table(
    box: Sandbox, layers: list[list[Any]], error: type[Exception] | None, check: Callable[[Path], bool] | None
) -> None:
    before = box.snapshot()
    layers = [_sub(entries, box) for entries in layers]
    if error is None:
        box.apply(*layers)
        assert check is None or check(box.target)
    else:
        with pytest.raises(error) as info:
            box.apply(*layers)
        assert "'" in str(info.value) or "truncated" in str(info.value)  # the message names the entry
    assert box.snapshot() == before


def test_absolute_symlink_parent_writes_inside_the_root(box: Sandbox) -> None:
    before = box.snapshot()
    box.apply([tb.symlink("l", str(box.outside)), tb.file("l/secret.txt", b"inside")])
    assert (box.target / str(box.outside).lstrip("/") / "secret.txt").read_bytes() == b"inside"
    assert box.snapshot() == before


def _malformed(case: str) -> bytes:
    good = tb.build_tar([tb.file("ok", b"fine")])
    if case == "bad checksum":
        block = bytearray(good)
        block[0:2] = b"zz"
        return bytes(block)
    if case == "truncated header":
        return good[:300]
    if case == "truncated data":
        return tb.build_tar([tb.file("a", b"x" * 2000)])[:1024]
    if case == "lone zero block":  # Go's reader (docker) rejects this; stopping there would hide "ok"
        return b"\0" * 512 + good
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    records = {
        "bad PAX length": b"99 path=x\n",
        "PAX length not a number": b"1x path=x\n",
        "PAX record without =": b"9 pathx\n\n",
        "PAX bad size": b"14 size=-1234\n",
        "PAX huge": b"",
    }[case]
    if case == "PAX huge":
        info.size = 1 << 30
        return info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024
    info.size = len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512) + good


@pytest.mark.parametrize(
    "case",
    [
        "bad checksum",
        "truncated header",
        "truncated data",
        "lone zero block",
        "bad PAX length",
        "PAX length not a number",
        "PAX record without =",
        "PAX bad size",
        "PAX huge",
    ],
)
def test_malformed_archives_are_corrupt_archive_errors(box: Sandbox, case: str) -> None:
    before = box.snapshot()
    with pytest.raises(CorruptArchiveError):
        apply_layer(io.BytesIO(_malformed(case)), box.target)
    assert box.snapshot() == before


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_in_every_tar_format(box: Sandbox, fmt: int) -> None:
    deep = "/".join(["d" * 50] * 2) + "/" + "f" * 80  # > 100 chars: ustar prefix, GNU longname or PAX path
    target = "t" * 90 if fmt == tarfile.USTAR_FORMAT else "/" + deep  # ustar cannot hold a long link target
    data = tb.build_tar([tb.file(deep, b"x"), tb.symlink("link", target)], fmt=fmt)  # type: ignore[arg-type]
    apply_layer(io.BytesIO(data), box.target)
    assert (box.target / deep).read_bytes() == b"x"
    assert os.readlink(box.target / "link") == target


def test_tar_dialect_edges(box: Sandbox) -> None:
    one = tb.build_tar([tb.file("one", b"1")])
    apply_layer(io.BytesIO(one[:1024]), box.target)  # no end-of-archive blocks at all: ends cleanly
    apply_layer(io.BytesIO(tb.build_tar([tb.file("two", b"2")])[:1536]), box.target)  # a single zero block
    gnu = bytearray(tarfile.TarInfo("three").tobuf(tarfile.GNU_FORMAT))
    gnu[345:357] = b"14000000000\0"  # GNU keeps atime here; it is not a ustar name prefix
    gnu[148:156] = b"        "
    gnu[148:155] = b"%06o\0" % sum(gnu)
    apply_layer(io.BytesIO(bytes(gnu) + b"\0" * 1024), box.target)
    data = tb.build_tar([(tarfile.TarInfo("x"), b""), tb.directory("d", size=4096), tb.file("after", b"a")])
    apply_layer(io.BytesIO(data), box.target)  # a directory's size field is ignored, as Go and tarfile do
    assert sorted(os.listdir(box.target)) == ["after", "d", "one", "three", "two", "x"]


def test_safe_parts() -> None:
    assert safe_parts("./a//b/./c/") == ["a", "b", "c"]
    assert safe_parts("/etc/passwd") == ["etc", "passwd"]
    assert safe_parts("./") == []
    for bad in ("../x", "a/../../b", "a/..", "x\x00y"):
        with pytest.raises(UnsafeArchiveError):
            safe_parts(bad)


def test_valid_symlinks_are_created_as_stored(box: Sandbox) -> None:
    box.apply(
        [
            tb.directory("usr/lib"),
            tb.directory("var"),
            tb.symlink("var/run", "/run"),
            tb.symlink("lib", "usr/lib"),
            tb.directory("a/b"),
            tb.symlink("a/b/c", "../../x"),
            tb.symlink("dangling", "/nonexistent/deep/path"),
            tb.symlink("escaping-but-never-followed", "../../../../etc/shadow"),
            tb.file("lib/libc.so", b"elf"),  # through lib -> usr/lib (inside the root)
        ]
    )
    t = box.target
    assert os.readlink(t / "var/run") == "/run"
    assert os.readlink(t / "lib") == "usr/lib"
    assert os.readlink(t / "a/b/c") == "../../x"
    assert os.readlink(t / "dangling") == "/nonexistent/deep/path"
    assert os.readlink(t / "escaping-but-never-followed") == "../../../../etc/shadow"
    assert (t / "usr/lib/libc.so").read_bytes() == b"elf"
    assert (t / "lib").is_symlink()


def test_whiteouts_across_layers(box: Sandbox) -> None:
    box.apply(
        [tb.file("a/x", b"1"), tb.file("a/y", b"2"), tb.file("b/z", b"3"), tb.file("keep", b"4")],
        [tb.whiteout("a/x"), tb.whiteout("b"), tb.whiteout("missing"), tb.whiteout("nodir/missing")],
    )
    t = box.target
    assert sorted(os.listdir(t)) == ["a", "keep"]
    assert os.listdir(t / "a") == ["y"]
    assert not (t / ".wh.b").exists() and not (t / "a/.wh.x").exists()


def test_whiteout_does_not_hide_the_same_layer(box: Sandbox) -> None:
    box.apply([tb.file("f", b"lower")], [tb.file("g", b"same"), tb.whiteout("g"), tb.whiteout("f")])
    assert (box.target / "g").read_bytes() == b"same"
    assert not (box.target / "f").exists()


def test_opaque_directory(box: Sandbox) -> None:
    box.apply(
        [tb.file("d/old", b"1"), tb.file("d/sub/deep", b"2"), tb.file("d/keep/lower", b"3"), tb.file("other", b"4")],
        [
            tb.file("d/-early", b"same layer, before the marker"),
            tb.directory("d/keep"),
            tb.file("d/keep/fresh", b"5"),
            tb.opaque_whiteout("d"),
            tb.file("d/late", b"after the marker"),
        ],
    )
    t = box.target
    assert sorted(os.listdir(t / "d")) == ["-early", "keep", "late"]
    assert os.listdir(t / "d/keep") == ["fresh"]  # the lower d/keep/lower is hidden too
    assert (t / "other").exists()
    assert not (t / "d/.wh..wh..opq").exists()


def test_opaque_root_and_missing_dir(box: Sandbox) -> None:
    box.apply([tb.file("a", b"1"), tb.file("b", b"2")], [tb.opaque_whiteout("nothing-here"), tb.file("c", b"3")])
    box.apply([tb.file("./.wh..wh..opq"), tb.file("d", b"4")])
    assert sorted(os.listdir(box.target)) == ["d"]


def test_replacements(box: Sandbox) -> None:
    box.apply(
        [tb.directory("d"), tb.file("d/inner", b"x"), tb.file("f", b"file")],
        [tb.file("d", b"now a file"), tb.directory("f"), tb.file("f/inner", b"y")],
    )
    assert (box.target / "d").read_bytes() == b"now a file"
    assert (box.target / "f/inner").read_bytes() == b"y"


def test_metadata_modes_mtimes_and_hardlinks(box: Sandbox) -> None:
    box.apply(
        [
            tb.directory("./", 0o751, mtime=1000),
            tb.directory("ro", 0o555, mtime=2000),
            tb.file("ro/file", b"data", 0o4755, mtime=3000),  # created inside a read-only dir
            tb.hardlink("ro/link", "ro/file"),
            tb.file("secret", b"s", 0o000, mtime=4000),
            tb.symlink("sl", "ro/file", mtime=5000),
            tb.directory("sticky", 0o1777),
            tb.fifo("pipe", 0o620),
        ]
    )
    t = box.target
    assert stat.S_IMODE(t.stat().st_mode) == 0o751 and t.stat().st_mtime == 1000
    assert stat.S_IMODE((t / "ro").stat().st_mode) == 0o555 and (t / "ro").stat().st_mtime == 2000
    st = (t / "ro/file").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime == 3000 and st.st_nlink == 2
    assert (t / "ro/link").stat().st_ino == st.st_ino
    assert stat.S_IMODE((t / "secret").stat().st_mode) == 0 and (t / "secret").stat().st_mtime == 4000
    assert (t / "sl").lstat().st_mtime == 5000
    assert stat.S_IMODE((t / "sticky").stat().st_mode) == 0o1777
    assert stat.S_IMODE((t / "pipe").lstat().st_mode) == 0o620


@pytest.mark.skipif(not ROOT, reason="needs root to chown and mknod")
def test_privileged_ownership_devices_and_xattrs(box: Sandbox) -> None:
    box.apply(
        [
            tb.file("owned", b"x", uid=1234, gid=5678),
            tb.symlink("owned-link", "owned", uid=42, gid=43),
            tb.char_device("dev/null", 1, 3),
            tb.file(
                "attr",
                b"x",
                pax_headers={"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.trusted.overlay.opaque": "y"},
            ),
        ],
        unprivileged=False,
    )
    t = box.target
    assert (t / "owned").stat().st_uid == 1234 and (t / "owned").stat().st_gid == 5678
    assert (t / "owned-link").lstat().st_uid == 42
    st = (t / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert os.getxattr(t / "attr", "user.note") == b"hello"
    with pytest.raises(OSError):
        os.getxattr(t / "attr", "trusted.overlay.opaque")  # overlayfs' own xattrs are never set


def test_unprivileged_skips_devices_and_ownership(box: Sandbox) -> None:
    stats = apply_layer(
        io.BytesIO(
            tb.build_tar(
                [
                    tb.char_device("dev/null", 1, 3),
                    tb.block_device("dev/loop0"),
                    tb.file("owned", b"x", uid=1234, gid=5678),
                    tb.fifo("dev/pipe"),
                ]
            )
        ),
        box.target,
        unprivileged=True,
    )
    assert not os.path.lexists(box.target / "dev/null") and not os.path.lexists(box.target / "dev/loop0")
    assert stat.S_ISFIFO((box.target / "dev/pipe").lstat().st_mode)
    assert (box.target / "owned").stat().st_uid == os.geteuid()
    assert stats.skipped == 2 and stats.devices == 0 and stats.fifos == 1 and stats.files == 1
    assert any("dev/null" in w for w in stats.warnings)


def _as_nobody(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child with uid/gid 65534 (no capabilities); re-raise its failure here."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        report = r.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report


@pytest.fixture
def nobody_target() -> Iterator[Path]:
    """A target directory owned by uid 65534 under a world-traversable temporary directory."""
    base = Path(tempfile.mkdtemp(prefix="imgci-layerfs-"))
    try:
        base.chmod(0o755)
        (base / "target").mkdir()
        os.chown(base / "target", 65534, 65534)
        yield base / "target"
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755, follow_symlinks=False)
        shutil.rmtree(base)


@pytest.mark.skipif(not ROOT, reason="needs root to fork a child as another user")
def test_non_root_extraction_of_restrictive_modes(nobody_target: Path) -> None:
    """Without CAP_DAC_OVERRIDE, read-only and 0000 directories must neither block extraction nor whiteouts."""
    target = nobody_target
    layers = [
        [tb.directory("ro", 0o555), tb.file("ro/a", b"1"), tb.directory("ro/locked", 0o000), tb.file("ro/locked/b")],
        [tb.file("ro/c", b"2"), tb.file("ro/locked/d", b"3")],
        [tb.whiteout("ro/locked"), tb.char_device("dev/null")],
    ]

    def child() -> None:
        for n, entries in enumerate(layers):
            stats = apply_layer(io.BytesIO(tb.build_tar(entries)), target)
            if n == 0:
                assert stat.S_IMODE(os.lstat(target / "ro/locked").st_mode) == 0
        assert sorted(os.listdir(target / "ro")) == ["a", "c"]
        assert stat.S_IMODE(os.stat(target / "ro").st_mode) == 0o555
        assert not os.path.lexists(target / "dev/null")
        assert stats.skipped == 1

    _as_nobody(child)


# -- unpack_image ---------------------------------------------------------------------------------------------
def _image(store: Store, layers: list[bytes], compression: str = "gzip", diff_ids: list[str] | None = None) -> Manifest:
    descs, ids = [], []
    for raw in layers:
        with store.blob_writer() as w:
            cw = CompressingWriter(w, compression)
            cw.write(raw)
            d = cw.finish()
            w.commit()
        descs.append(Descriptor(d.media_type, d.digest, d.size))
        ids.append(d.diff_id.value)
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids or ids}}
    cfg = store.write_blob(ImageConfig(doc).to_bytes())
    manifest = Manifest.build(Descriptor(OCI_CONFIG, cfg.digest, cfg.size), descs)
    store.write_blob(manifest.raw)
    return manifest


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_unpack_image_applies_layers_in_order(tmp_path: Path, compression: str) -> None:
    store = Store(tmp_path / "state")
    manifest = _image(
        store,
        [
            tb.build_tar(
                [tb.directory("etc"), tb.file("etc/a", b"1"), tb.file("etc/b", b"2"), tb.directory("ro", 0o555)]
            ),
            tb.build_tar([tb.whiteout("etc/a"), tb.file("etc/c", b"3"), tb.file("ro/x", b"4")]),
        ],
        compression,
    )
    stats = unpack_image(store, manifest, tmp_path / "rootfs")
    assert sorted(os.listdir(tmp_path / "rootfs/etc")) == ["b", "c"]
    assert stat.S_IMODE((tmp_path / "rootfs/ro").stat().st_mode) == 0o555
    assert stats.files == 4 and stats.whiteouts == 1


def test_unpack_image_verifies_diff_ids(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    layer = tb.build_tar([tb.file("f", b"x")])
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DigestMismatchError, match="image config says"):
        unpack_image(store, _image(store, [layer], diff_ids=[wrong]), tmp_path / "r1")
    with pytest.raises(DigestMismatchError, match="diff_ids"):
        unpack_image(store, _image(store, [layer, layer], diff_ids=[wrong]), tmp_path / "r2")


def test_unpack_image_detects_a_corrupt_blob_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    manifest = _image(store, [tb.build_tar([tb.file("f", b"x" * 1000)])], "none")
    path = store.blob_path(manifest.layers[0].digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[600] ^= 1  # inside f's content: still a valid tar
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        unpack_image(store, manifest, tmp_path / "r")


def test_unpack_image_needs_an_empty_target(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    manifest = _image(store, [tb.build_tar([tb.file("f")])])
    (tmp_path / "r").mkdir()
    (tmp_path / "r/existing").write_text("x")
    with pytest.raises(ArchiveError, match="not an empty directory"):
        unpack_image(store, manifest, tmp_path / "r")
