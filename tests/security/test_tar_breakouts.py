"""Tar and file-system breakouts, against every place imgci writes a hostile archive to disk.

Entry points: the layer appliers (``apply_layer``; ``unpack_image``'s shared applier; the native snapshotter's
``materialise``; the overlay snapshotter's ``OverlayLayerApplier`` through ``ensure_snapshot``; the layer store's
``extract_layer_dir``), and end to end through the CLI: ``imgci unpack`` and ``imgci load``, ADD of a local archive
and COPY of a context with symlinks pointing out in ``imgci build``, and ``imgci unpack`` as an unprivileged user.

Every case runs in a sandbox: the target sits at ``base/up1/up2/target`` next to ``outside/secret.txt`` (mode 0600,
hardlinked as ``outside/secret-link``), ``canary.txt`` and a symlink, so escapes up to three levels up are seen.
After the case nothing outside the target may differ (type, mode, owner, link count, mtime, content or link
target) and nothing may appear; the case either raises the named ImgciError subclass with a message naming the
entry, or succeeds with a checked safe outcome. Absolute targets point at the sandbox's own absolute paths, so an
absolute escape would hit a canary too. Whiteouts and devices need root for the overlay snapshotter (tests run as
root in CI); the unprivileged device case also runs as the real user ``imgci-rootless``.

Lessons this table carries: containerd's archive breakout table (pkg/archive/tar_test.go), CVE-2021-32760 (chmod
through a hardlinked symlink), umoci CVE-2021-29136 (a symlink named ``.``), kaniko's context path traversal and
docker cp CVE-2019-14271 (never resolve a path of the image or context on the host).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imgci.build.sandbox.snapshots import ensure_snapshot, materialise, opaque_xattr
from imgci.build.sandbox.spec import LayerRef
from imgci.compression import CompressingWriter
from imgci.errors import ArchiveError, CorruptArchiveError, ImgciError, UnsafeArchiveError
from imgci.layerfs import ApplyStats, apply_layer, extract_layer_dir, unpack_image
from imgci.oci import OCI_CONFIG, Descriptor, ImageConfig, Manifest, Platform
from imgci.store import Store
from imgci.tarstream import MAX_DEPTH
from tests.conftest import Imgci
from tests.infra import rootfs as tb
from tests.infra.canary import outside_snapshot

ROOT = os.geteuid() == 0
SECRET = b"TOP-SECRET-CANARY-7f3a"  # searched for wherever imgci might have copied it
Entry = tb.TarEntry | tuple[tarfile.TarInfo, bytes]
Layer = list[Entry] | bytes  # entries, or raw (possibly malformed) archive bytes


# -- the sandbox ----------------------------------------------------------------------------------------------------
@dataclass
class Sandbox:
    """``base/up1/up2/{target, outside/{secret.txt, secret-link, sub/}, canary.txt, link-out -> outside}``."""

    base: Path
    target: Path

    @classmethod
    def make(cls, base: Path) -> Sandbox:
        target = base / "up1" / "up2" / "target"
        target.mkdir(parents=True)
        up2 = target.parent
        (up2 / "outside" / "sub").mkdir(parents=True)
        (up2 / "outside" / "secret.txt").write_bytes(SECRET)
        (up2 / "outside" / "secret.txt").chmod(0o600)
        os.link(up2 / "outside" / "secret.txt", up2 / "outside" / "secret-link")
        (up2 / "canary.txt").write_bytes(b"canary")
        (up2 / "canary.txt").chmod(0o640)
        (up2 / "link-out").symlink_to("outside")
        for p in (up2 / "canary.txt", up2 / "outside" / "secret.txt", up2 / "outside" / "sub", up2 / "outside"):
            os.utime(p, (1_000_000, 1_000_000))
        return cls(base, target)

    @property
    def outside(self) -> Path:
        return self.target.parent / "outside"

    @property
    def canary(self) -> Path:
        return self.target.parent / "canary.txt"

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Everything but the target (tests/infra/canary.py)."""
        return outside_snapshot(self.base, self.target)

    def subst(self, text: str) -> str:
        return text.replace("@OUT@", str(self.outside)).replace("@CANARY@", str(self.canary))


def _subst_entry(e: Entry, box: Sandbox) -> Entry:
    if isinstance(e, tb.TarEntry):
        return tb.TarEntry(**{**e.__dict__, "name": box.subst(e.name), "linkname": box.subst(e.linkname)})
    return e


def _tar(layer: Layer, box: Sandbox) -> bytes:
    return layer if isinstance(layer, bytes) else tb.build_tar([_subst_entry(e, box) for e in layer])


# -- the appliers -----------------------------------------------------------------------------------------------------
MERGED = ("apply_layer", "unpack_image", "materialise")  # layers applied onto one root, in order
ALONE = ("overlay_snapshot", "layer_store")  # each layer extracted on its own directory
APPLIERS = MERGED + ALONE


def _layer_ref(work: Path, raw: bytes) -> LayerRef:
    path = work / f"layer-{hashlib.sha256(raw).hexdigest()[:16]}.tar"
    path.write_bytes(raw)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return LayerRef(str(path), digest, digest)  # uncompressed: blob digest = diff_id


def _image(store: Store, layers: list[bytes]) -> Manifest:
    descs, ids = [], []
    for raw in layers:
        with store.blob_writer() as w:
            writer = CompressingWriter(w, "gzip")
            writer.write(raw)
            d = writer.finish()
            w.commit()
        descs.append(Descriptor(d.media_type, d.digest, d.size))
        ids.append(d.diff_id.value)
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ids}}
    cfg = store.write_blob(ImageConfig(doc).to_bytes())
    manifest = Manifest.build(Descriptor(OCI_CONFIG, cfg.digest, cfg.size), descs)
    store.write_blob(manifest.raw)
    return manifest


def run_applier(
    kind: str, layers: list[bytes], box: Sandbox, work: Path, *, unprivileged: bool = False
) -> tuple[list[Path], list[ApplyStats]]:
    """Apply ``layers`` (bottom first) with applier ``kind`` under ``box.target``; returns the roots written (the
    target for merged appliers, one directory per layer for the others) and the stats."""
    stats: list[ApplyStats] = []
    roots: list[Path] = []
    if kind == "apply_layer":
        stats = [apply_layer(io.BytesIO(raw), box.target, unprivileged=unprivileged) for raw in layers]
        roots = [box.target]
    elif kind == "unpack_image":
        store = Store(work / "state")
        stats = [unpack_image(store, _image(store, layers), box.target, unprivileged=unprivileged)]
        roots = [box.target]
    elif kind == "materialise":
        refs = [_layer_ref(work, raw) for raw in layers]
        stats = [materialise(box.target, refs, unprivileged=unprivileged)[0]]
        roots = [box.target]
    elif kind == "overlay_snapshot":
        for raw in layers:
            lowers = roots[::-1]
            snap, st = ensure_snapshot(
                box.target, _layer_ref(work, raw), lowers, flavor="trusted", unprivileged=unprivileged
            )
            roots.append(snap)
            stats.extend([st] if st is not None else [])
    else:
        for n, raw in enumerate(layers):
            roots.append(box.target / f"layer{n}")
            roots[-1].mkdir()
            stats.append(extract_layer_dir(io.BytesIO(raw), roots[-1], _ignore, unprivileged=unprivileged))
    return roots, stats


def _ignore(kind: str, key: str, entry: object) -> None:
    pass


# -- the breakout table -----------------------------------------------------------------------------------------------
SAME = object()


@dataclass(frozen=True)
class Case:
    """``error`` (with ``mentions`` in its message) or success and ``check(root)`` for the merged appliers;
    ``alone`` the outcome when every layer is extracted on its own (default: the same), ``per`` overrides by
    applier."""

    name: str
    layers: list[Layer]
    error: type[ImgciError] | None = None
    mentions: str = ""
    check: Callable[[Path, Sandbox], bool] | None = None
    alone: Any = SAME
    per: dict[str, type[ImgciError] | None] = field(default_factory=dict)

    def expected(self, kind: str) -> type[ImgciError] | None:
        if kind in self.per:
            return self.per[kind]
        if kind in ALONE and self.alone is not SAME:
            return self.alone  # type: ignore[no-any-return]
        return self.error


def _pax(records: dict[str, bytes] | bytes, then: list[Entry] | None = None, name: str = "x") -> bytes:
    """A PAX extended header with ``records`` (raw bytes taken as they are), then entry ``name`` (or ``then``)."""
    body = b"".join(_pax_record(k, v) for k, v in records.items()) if isinstance(records, dict) else records
    info = tarfile.TarInfo("PaxHeaders/x")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    return tb.build_tar([(info, body), *(then if then is not None else [tb.file(name, b"data")])])


def _pax_record(key: str, value: bytes) -> bytes:
    """``"%d key=value\\n"`` with the length that counts its own digits."""
    rest = b" %s=%s\n" % (key.encode(), value)
    length = len(rest) + 1
    while length != len(b"%d" % length) + len(rest):
        length += 1
    return b"%d" % length + rest


def _truncated(cut: int, entries: list[Entry]) -> bytes:
    return tb.build_tar(entries)[:cut]


def _gnu_longname(name: str, data: bytes = b"x", size: int | None = None) -> bytes:
    """A GNU ``L`` long-name header followed by a file entry (``size`` overrides the extension's size)."""
    raw = name.encode() + b"\0"
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, len(raw) if size is None else size
    head = info.tobuf(tarfile.USTAR_FORMAT) + raw + b"\0" * (-len(raw) % 512)
    return head + tb.build_tar([tb.file("short", data)])


def _with_base256(entry: tb.TarEntry, offset: int, width: int, value: int) -> bytes:
    """``entry`` as a ustar archive whose numeric field at ``offset`` holds ``value`` in GNU base-256."""
    block = bytearray(entry.tarinfo().tobuf(tarfile.USTAR_FORMAT))
    rest = value if value >= 0 else 256 ** (width - 1) + value  # two's complement below a 0xff marker
    block[offset : offset + width] = (b"\x80" if value >= 0 else b"\xff") + rest.to_bytes(width - 1, "big")
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    data = entry.data + b"\0" * (-len(entry.data) % 512)
    return bytes(block) + data + b"\0" * 1024


def _huge_pax() -> bytes:
    info = tarfile.TarInfo("PaxHeaders/x")
    info.type, info.size = tarfile.XHDTYPE, 1 << 30
    return info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024


def _inside(root: Path, box: Sandbox) -> Path:
    """Where the sandbox's absolute outside path lands when taken relative to ``root`` (as in a chroot)."""
    return root / str(box.outside).lstrip("/")


def _is_link_to(path: Path, target: str) -> bool:
    return path.is_symlink() and os.readlink(path) == target


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


f, d, sl, hl = tb.file, tb.directory, tb.symlink, tb.hardlink
U, C = UnsafeArchiveError, CorruptArchiveError

CASES: list[Case] = [
    # -- '..' and absolute names ------------------------------------------------------------------------------------
    Case("dotdot file", [[f("../canary.txt", b"p")]], U, "'../canary.txt'"),
    Case("dotdot deep file", [[f("a/b/../../../canary.txt", b"p")]], U, "'a/b/../../../canary.txt'"),
    Case("dotdot dir", [[d("../outside", 0o777)]], U, "'../outside'"),
    Case("dotdot symlink name", [[sl("../outside/evil", "/")]], U, "'../outside/evil'"),
    Case("dotdot hardlink name", [[f("f", b"x"), hl("../outside/h", "f")]], U, "'../outside/h'"),
    Case("dotdot fifo name", [[tb.fifo("../outside/p")]], U, "'../outside/p'"),
    Case("dotdot whiteout", [[f("../outside/.wh.secret.txt")]], U, "'../outside/.wh.secret.txt'"),
    Case("dotdot opaque", [[f("../outside/.wh..wh..opq")]], U, "'../outside/.wh..wh..opq'"),
    Case("dotdot after absolute", [[f("/../canary.txt", b"p")]], U, "'/../canary.txt'"),
    Case("dotdot in PAX path", [_pax({"path": b"../canary.txt"}, name="innocent")], U, "'../canary.txt'"),
    Case("dotdot in GNU long name", [_gnu_longname("a" * 120 + "/../../canary.txt")], U, "/../../canary.txt'"),
    Case(
        "absolute name is confined",
        [[f("/canary.txt", b"inside"), f("@OUT@/secret.txt", b"inside too")]],
        check=lambda t, b: (
            (t / "canary.txt").read_bytes() == b"inside"
            and (_inside(t, b) / "secret.txt").read_bytes() == b"inside too"
        ),
    ),
    # -- symlink escapes ----------------------------------------------------------------------------------------------
    Case(
        "absolute symlink parent is confined",
        [[sl("l", "@OUT@"), f("l/secret.txt", b"inside")]],
        check=lambda t, b: (t / "l").is_symlink() and (_inside(t, b) / "secret.txt").read_bytes() == b"inside",
    ),
    Case("up-and-out symlink parent", [[sl("l", "../outside"), f("l/secret.txt", b"p")]], U, "'l/secret.txt'"),
    Case(
        "deep up-and-out symlink parent",
        [[d("a/b"), sl("a/b/l", "../../../.."), f("a/b/l/up2/canary.txt", b"p")]],
        U,
        "'a/b/l/up2/canary.txt'",
    ),
    Case(
        "through a symlinked parent",
        [[d("real"), sl("real/up", "../.."), sl("alias", "real"), f("alias/up/canary.txt", b"p")]],
        U,
        "'alias/up/canary.txt'",
    ),
    Case(
        "absolute then relative chain",
        [[sl("a", "/b"), sl("b", "../.."), f("a/canary.txt", b"p")]],
        U,
        "'a/canary.txt'",
    ),
    Case("symlink via escaping parent", [[sl("l", "../outside"), sl("l/evil", "/")]], U, "'l/evil'"),
    Case("dir via escaping parent", [[sl("l", "../outside"), d("l/sub", 0o777)]], U, "'l/sub'"),
    Case("fifo via escaping parent", [[sl("l", "../outside"), tb.fifo("l/p")]], U, "'l/p'"),
    Case("hardlink via escaping parent", [[f("f", b"x"), sl("l", "../outside"), hl("l/h", "f")]], U, "'l/h'"),
    Case(
        "escaping symlink across layers",
        [[sl("l", "../outside")], [f("l/secret.txt", b"p")]],
        U,
        "'l/secret.txt'",
        alone=None,  # alone, the upper layer has no 'l': it is a new directory
    ),
    Case(
        "absolute symlink across layers is confined",
        [[sl("l", "@OUT@")], [f("l/secret.txt", b"inside")]],
        check=lambda t, b: (t / "l").is_symlink() and (_inside(t, b) / "secret.txt").read_bytes() == b"inside",
    ),
    Case(
        "directory replaced by an escaping symlink, then written through",
        [[d("d"), f("d/x")], [sl("d", "../outside"), f("d/secret.txt", b"p")]],
        U,
        "'d/secret.txt'",
    ),
    Case(
        "file over a symlink to an outside file",
        [[sl("f", "@CANARY@")], [f("f", b"new", 0o777)]],
        check=lambda t, b: not (t / "f").is_symlink() and (t / "f").read_bytes() == b"new",
    ),
    Case(
        "directory metadata is not applied through a later symlink",
        [[d("d", 0o777, mtime=5), sl("d", "../outside")], [d("e", 0o777), sl("e", "@OUT@")]],
        check=lambda t, b: _is_link_to(t / "d", "../outside"),
    ),
    Case(
        "directory metadata across layers is not applied through a symlink",
        [[d("d", 0o777, mtime=5)], [sl("d", "../outside")]],
        check=lambda t, b: _is_link_to(t / "d", "../outside"),
    ),
    Case("symlink loop", [[sl("a", "b"), sl("b", "a"), f("a/x", b"p")]], U, "'a/x'"),
    Case(
        "too many symlink levels",
        [[*(sl(f"l{i}", f"l{i + 1}") for i in range(45)), d("l45"), f("l0/x", b"p")]],
        U,
        "'l0/x'",
    ),
    # -- a symlink named '.' or '/' (umoci CVE-2021-29136) -------------------------------------------------------------
    Case("symlink named .", [[sl(".", "../outside"), f("secret.txt", b"p")]], U, "'.'"),
    Case("symlink named ./", [[sl("./", "@OUT@")]], U, "'./'"),
    Case("symlink named /", [[sl("/", "@OUT@")]], U, "'/'"),
    Case("symlink named . by PAX", [_pax({"path": b"."}, [sl("x", "../outside")])], U, "'.'"),
    Case(
        "symlink named d/. replaces d, then is written through",
        [[d("d"), sl("d/.", "../outside"), f("d/secret.txt", b"p")]],
        U,
        "'d/secret.txt'",
    ),
    Case("hardlink named .", [[f("f", b"x"), hl(".", "f")]], U, "'.'"),
    Case("file named /", [[f("/", b"x")]], U, "'/'"),
    # -- hardlink escapes ----------------------------------------------------------------------------------------------
    Case("hardlink to ..", [[hl("h", "../canary.txt")]], U, "'../canary.txt'"),
    Case("hardlink to a deep ..", [[d("a"), hl("h", "a/../../canary.txt")]], U, "'a/../../canary.txt'"),
    Case(
        "hardlink to an absolute host path",
        [[hl("h", "@CANARY@")]],
        C,
        "'h'",
        per={"layer_store": None},  # alone, a hardlink to a missing file may be into a lower layer: index only
    ),
    Case("hardlink to /etc/passwd", [[hl("h", "/etc/passwd")]], C, "'h'", per={"layer_store": None}),
    Case("hardlink through an absolute symlink", [[sl("l", "@OUT@"), hl("h", "l/secret.txt")]], U, "'h'"),
    Case("hardlink through an escaping symlink", [[sl("l", "../outside"), hl("h", "l/secret.txt")]], U, "'h'"),
    Case("hardlink through a symlink inside", [[f("d/f", b"x"), sl("l", "d"), hl("h", "l/f")]], U, "'h'"),
    Case("hardlink to itself", [[hl("h", "h")]], C, "'h'", per={"layer_store": None}),
    Case("hardlink to a directory", [[d("d"), hl("h", "d")]], U, "'h'"),
    Case("hardlink to the root", [[hl("h", "./")]], U, "'h'"),
    Case(
        "hardlink to a symlink, then chmod (CVE-2021-32760)",
        [[sl("s", "@OUT@/secret.txt"), hl("h", "s", mode=0o4777, uid=4242)]],
        check=lambda t, b: (t / "h").is_symlink() and (t / "h").lstat().st_ino == (t / "s").lstat().st_ino,
    ),
    Case(
        "hardlink to a symlink, then a directory of that name",
        [[sl("s", "../outside"), hl("h", "s"), d("h", 0o777)]],
        check=lambda t, b: (t / "h").is_dir() and not (t / "h").is_symlink() and _mode(t / "h") == 0o777,
    ),
    Case(
        "hardlink to a symlink, then a file of that name",
        [[sl("s", "@CANARY@"), hl("h", "s"), f("h", b"new", 0o4777)]],
        check=lambda t, b: (t / "h").read_bytes() == b"new" and _is_link_to(t / "s", str(b.canary)),
    ),
    Case(
        "hardlink to a symlink, then written through",
        [[sl("s", "../outside"), hl("h", "s"), f("h/secret.txt", b"p")]],
        U,
        "'h/secret.txt'",
    ),
    Case(
        "hardlink to a lower layer's symlink, then chmod",
        [[sl("s", "../canary.txt")], [hl("h", "s", mode=0o777), d("h", 0o777)]],
        check=lambda t, b: (t / "h").is_dir(),
        per={"overlay_snapshot": C, "layer_store": None},  # the overlay copies lower *files* only
    ),
    Case(
        "hardlink to a lower layer's symlink, then fifo chmod",
        [[sl("s", "@CANARY@")], [hl("h", "s"), tb.fifo("h", 0o777)]],
        check=lambda t, b: stat.S_ISFIFO((t / "h").lstat().st_mode) and (t / "s").is_symlink(),
        per={"overlay_snapshot": C, "layer_store": None},
    ),
    # -- whiteouts -----------------------------------------------------------------------------------------------------
    Case("whiteout of ..", [[f(".wh..."), f("x")]], U, "'.wh...'"),
    Case("whiteout of .. in a subdirectory", [[d("d"), f("d/.wh...")]], U, "'d/.wh...'"),
    Case("whiteout of .", [[d("d"), f("d/.wh..")]], U, "'d/.wh..'"),
    Case("whiteout of the root", [[f(".wh.")]], U, "'.wh.'"),
    Case(
        "whiteout on a symlink to an outside file",
        [[sl("s", "@CANARY@"), sl("r", "../canary.txt")], [f(".wh.s"), f(".wh.r")]],
        check=lambda t, b: not os.path.lexists(t / "s") and not os.path.lexists(t / "r"),
    ),
    Case(
        "whiteout on a symlink to an outside directory",
        [[sl("s", "@OUT@"), sl("r", "../outside")], [f(".wh.s"), f(".wh.r")]],
        check=lambda t, b: not os.path.lexists(t / "s") and not os.path.lexists(t / "r"),
    ),
    Case(
        "whiteout on a hardlinked symlink",
        [[sl("s", "@OUT@/secret.txt"), hl("h", "s")], [f(".wh.h")]],
        check=lambda t, b: not os.path.lexists(t / "h") and (t / "s").is_symlink(),
    ),
    Case(
        "whiteout through an escaping symlink",
        [[sl("l", "../outside")], [f("l/.wh.secret.txt")]],
        U,
        "'l/.wh.secret.txt'",
        alone=None,
    ),
    Case(
        "whiteout through an escaping symlink, same layer", [[sl("l", "../outside"), f("l/.wh.secret.txt")]], U, "'l/"
    ),
    Case(
        "whiteout through an absolute symlink is confined",
        [[sl("l", "@OUT@"), f("same/.wh.x")], [f("l/.wh.secret.txt"), f("l/.wh.sub")]],
        check=lambda t, b: (t / "l").is_symlink(),
    ),
    Case(
        "whiteout through an absolute symlink, same layer",
        [[sl("l", "@OUT@"), f("l/.wh.secret.txt"), f("l/.wh..wh..opq")]],
        check=lambda t, b: (t / "l").is_symlink(),
    ),
    Case("opaque through an escaping symlink", [[sl("l", "../outside")], [f("l/.wh..wh..opq")]], U, "'l/", alone=None),
    Case(
        "opaque through an absolute symlink is confined",
        [[sl("l", "@OUT@"), sl("m", "/")], [f("l/.wh..wh..opq"), f("m/sub/.wh..wh..opq")]],
        check=lambda t, b: (t / "l").is_symlink(),
    ),
    Case(
        "opaque whiteout clears only its own directory",
        [
            [f("a/x"), f("a/sub/y"), f("a2/z"), f("ab/q"), f("b/a/x"), f("top"), sl("a-link", "a")],
            [f("a/.wh..wh..opq"), f("a/new")],
        ],
        check=lambda t, b: (
            sorted(os.listdir(t / "a")) == ["new"]
            and sorted(os.listdir(t)) == ["a", "a-link", "a2", "ab", "b", "top"]
            and (t / "b/a/x").exists()
            and (t / "a2/z").exists()
        ),
    ),
    Case(
        "opaque whiteout of the root clears the root only",
        [[f("f"), d("d"), sl("l", "../outside")], [f(".wh..wh..opq"), f("new")]],
        check=lambda t, b: os.listdir(t) == ["new"],
    ),
    Case(
        "whiteout marker stored as a symlink",
        [[f("x")], [sl(".wh.x", "../canary.txt"), sl(".wh..wh..opq", "@OUT@")]],
        check=lambda t, b: os.listdir(t) == [],
    ),
    # -- devices (privileged here; unprivileged below) -----------------------------------------------------------------
    Case(
        "device over a symlink replaces the link",
        [[sl("n", "../canary.txt")], [tb.char_device("n", mode=0o777)]],
        check=lambda t, b: not (t / "n").is_symlink(),
    ),
    Case("device named ..", [[tb.char_device("../outside/null")]], U, "'../outside/null'"),
    # -- huge sizes, truncated archives, bad PAX records ---------------------------------------------------------------
    Case("huge declared size on a short stream", [[f("big", b"abc", size=1 << 40)]], C, "truncated"),
    Case("huge size beyond int64 in PAX", [_pax({"size": b"9" * 30})], C, "size"),
    Case(
        "huge size beyond int64 in base-256",
        [_with_base256(f("big", b"abc"), 124, 12, 1 << 80)],
        C,
        "size out of range",
    ),
    Case("huge GNU long name", [_gnu_longname("x", size=1 << 32)], C, "too large"),
    Case("huge PAX header", [_huge_pax()], C, "too large"),
    Case("truncated in a header", [_truncated(300, [f("a", b"x")])], C, "truncated"),
    Case("truncated in the data", [_truncated(1024, [f("a", b"x" * 2000)])], C, "truncated"),
    Case("truncated in the padding", [_truncated(512 + 100 + 50, [f("a", b"x" * 100)])], C, "truncated"),
    Case("truncated in a PAX header", [_pax({"path": b"p" * 600})[:700]], C, "truncated"),
    Case("truncated after a PAX header", [_pax({"path": b"p"})[:1024]], C, "extension header without an entry"),
    Case("truncated in a GNU long name", [_gnu_longname("n" * 700)[:700]], C, "truncated"),
    Case("PAX length too long", [_pax(b"99 path=x\n")], C, "PAX"),
    Case("PAX length too short", [_pax(b"5 path=x\n")], C, "PAX"),
    Case("PAX length zero", [_pax(b"0 path=x\n")], C, "PAX"),
    Case("PAX length negative", [_pax(b"-9 path=x\n")], C, "PAX"),
    Case("PAX length not a number", [_pax(b"1x path=x\n")], C, "PAX"),
    Case("PAX length huge", [_pax(b"99999999999999999999999 path=x\n")], C, "PAX"),
    Case("PAX record without newline", [_pax(b"10 path=xx")], C, "PAX"),
    Case("PAX record without =", [_pax(b"9 pathx\n\n")], C, "PAX"),
    Case("PAX key with NUL", [_pax({"SCHILY.xattr.user.a\0b": b"v"})], C, "PAX"),
    Case("PAX mtime out of range", [_pax({"mtime": b"1e300"})], C, "mtime"),
    Case("PAX mtime not Go's syntax", [_pax({"mtime": b"1_000"})], C, "mtime"),
    Case("PAX uid beyond int64", [_pax({"uid": b"9" * 25})], C, "uid"),
    Case("PAX size with bad digits", [_pax({"size": b"-1234"})], C, "size"),
    Case(
        "device numbers beyond dev_t",
        [_with_base256(tb.char_device("c"), 329, 8, 1 << 40)],
        ArchiveError,
        "'c'",
        per={"layer_store": None},  # devices are metadata only there
    ),
    Case("too deep", [[f("a/" * (MAX_DEPTH + 1) + "f")]], U, "path components"),
]


def _applier_params() -> list[Any]:
    needs_root = pytest.mark.skipif(not ROOT, reason="overlay lowers need root (whiteout devices, trusted xattrs)")
    return [pytest.param(k, marks=[needs_root] if k == "overlay_snapshot" else []) for k in APPLIERS]


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox.make(tmp_path / "box")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.mark.parametrize("kind", _applier_params())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_breakout(case: Case, kind: str, box: Sandbox, work: Path) -> None:
    layers = [_tar(layer, box) for layer in case.layers]
    before = box.snapshot()
    expected = case.expected(kind)
    if expected is None:
        roots, _ = run_applier(kind, layers, box, work)
        if case.check is not None and kind in MERGED:
            assert case.check(roots[-1], box), f"{case.name}: unexpected result in the target"
    else:
        with pytest.raises(ImgciError) as info:
            run_applier(kind, layers, box, work)
        assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
        if case.alone is SAME or kind in MERGED:
            assert case.mentions in str(info.value)
    assert box.snapshot() == before


def test_parent_is_a_regular_file(box: Sandbox, work: Path) -> None:
    before = box.snapshot()
    for kind in APPLIERS[:3]:
        target = box.target
        with pytest.raises(ArchiveError, match=r"'f/x'.*not a directory"):
            run_applier(kind, [tb.build_tar([f("f", b"x"), f("f/x", b"y")])], box, work)
        for child in target.iterdir():
            child.unlink()
    assert box.snapshot() == before


VALID_LOWER = [
    d("run"),
    d("var"),
    sl("var/run", "/run"),
    d("usr/lib"),
    sl("lib", "usr/lib"),
    d("a/b"),
    sl("a/b/c", "../../x"),
    sl("etc/mtab", "/proc/self/mounts"),
    d("usr/share/doc/pkg"),
    sl("usr/share/doc/pkg/copyright", "../../../../etc/os-release"),
    sl("dangling", "/nonexistent/deep/path"),
    sl("never-followed", "../../../../../canary.txt"),
    sl("self", "."),
    sl("bin", "/usr/bin"),
    d("usr/bin"),
]
VALID_UPPER = [f("var/run/pid", b"1"), f("lib/libc.so", b"elf"), f("self/me", b"m"), f("bin/sh", b"sh", 0o755)]


@pytest.mark.parametrize("kind", _applier_params())
def test_valid_absolute_and_deep_relative_symlinks_keep_working(kind: str, box: Sandbox, work: Path) -> None:
    before = box.snapshot()
    roots, _ = run_applier(kind, [tb.build_tar(VALID_LOWER), tb.build_tar(VALID_UPPER)], box, work)
    lower = roots[0]
    for e in VALID_LOWER:
        if e.type == tarfile.SYMTYPE:
            assert os.readlink(lower / e.name) == e.linkname, e.name
    if kind in MERGED:
        t = roots[0]
        assert (t / "run/pid").read_bytes() == b"1"  # through var/run -> /run, inside the root
        assert (t / "usr/lib/libc.so").read_bytes() == b"elf"
        assert (t / "me").read_bytes() == b"m"
        assert (t / "usr/bin/sh").read_bytes() == b"sh"
        assert (t / "var/run").is_symlink() and (t / "lib").is_symlink() and (t / "bin").is_symlink()
    assert box.snapshot() == before


@pytest.mark.parametrize("kind", _applier_params())
def test_unprivileged_devices_are_skipped_with_a_warning(kind: str, box: Sandbox, work: Path) -> None:
    layers = [
        tb.build_tar([sl("n", "../canary.txt"), d("dev"), f("dev/keep", b"k")]),
        tb.build_tar([tb.char_device("dev/null", 1, 3), tb.block_device("dev/sda", 8, 0), tb.char_device("n", 1, 3)]),
    ]
    before = box.snapshot()
    roots, stats = run_applier(kind, layers, box, work, unprivileged=True)
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                mode = os.lstat(os.path.join(dirpath, name)).st_mode
                assert not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)), os.path.join(dirpath, name)
    warnings = [w for st in stats for w in st.warnings]
    if kind == "layer_store":
        assert sum(st.devices for st in stats) == 3  # kept as metadata in the index, never created
    else:
        assert any("dev/null" in w and "unprivileged" in w for w in warnings), warnings
        assert sum(st.skipped for st in stats) == 3 and sum(st.devices for st in stats) == 0
    if kind in MERGED:
        assert _is_link_to(box.target / "n", "../canary.txt")  # skipped: the link in its way is left alone
        assert (box.target / "dev/keep").read_bytes() == b"k"
    assert box.snapshot() == before


@pytest.mark.skipif(not ROOT, reason="needs root for whiteout devices")
def test_overlay_hardlink_to_a_lower_file_never_follows_lower_symlinks(box: Sandbox, work: Path) -> None:
    """The overlay applier copies a hardlinked lower file into the upper snapshot: through a lower symlink (to
    the host, or inside), or to a lower symlink, it must find nothing rather than copy a host file."""
    lower = _layer_ref(work, tb.build_tar([sl("l", str(box.outside)), sl("r", "../outside"), sl("s", "l/secret.txt")]))
    low, _ = ensure_snapshot(box.target, lower, [], flavor="trusted")
    before = box.snapshot()
    for link in ("l/secret.txt", "r/secret.txt", "s", str(box.outside / "secret.txt"), "../outside/secret.txt"):
        upper = _layer_ref(work, tb.build_tar([f("ok", b"x"), hl("h", link)]))
        with pytest.raises(ArchiveError) as info:
            ensure_snapshot(box.target, upper, [low], flavor="trusted")
        assert "'h'" in str(info.value)
    assert box.snapshot() == before
    for dirpath, _, names in os.walk(box.target):
        for name in names:
            p = Path(dirpath, name)
            assert p.is_symlink() or not p.is_file() or SECRET not in p.read_bytes(), p


@pytest.mark.skipif(not ROOT, reason="needs root for whiteout devices")
def test_overlay_whiteouts_stay_in_their_snapshot(box: Sandbox, work: Path) -> None:
    """Whiteouts and opaque markers become devices and xattrs inside the layer's own directory only."""
    before = box.snapshot()
    layer = tb.build_tar([sl("l", str(box.outside)), f("d/.wh..wh..opq"), f("d/.wh.gone"), f("l/.wh.secret.txt")])
    (snap,), _ = run_applier("overlay_snapshot", [layer], box, work)
    assert os.getxattr(snap / "d", opaque_xattr("trusted")) == b"y"
    gone = (snap / "d/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert stat.S_ISCHR((_inside(snap, box) / "secret.txt").lstat().st_mode)  # l -> OUT is followed inside
    assert box.snapshot() == before


@pytest.mark.parametrize("kind", _applier_params())
def test_ids_beyond_uid_t_are_a_chown_warning(kind: str, box: Sandbox, work: Path) -> None:
    before = box.snapshot()
    layer = _pax({"uid": b"99999999999", "gid": b"4294967296"}, name="owned")
    roots, stats = run_applier(kind, [layer], box, work)
    assert (roots[0] / "owned").read_bytes() == b"data"
    assert any("cannot set ownership" in w and "'owned'" in w for s in stats for w in s.warnings)
    assert box.snapshot() == before


# -- end to end: imgci unpack and imgci load ----------------------------------------------------------------------
def _docker_archive(images: dict[str, list[bytes]], extra: list[Entry] | None = None, **manifest: Any) -> bytes:
    """A ``docker save`` tar holding ``images`` (tag -> layer tars); ``manifest`` overrides entry fields."""
    entries: list[Entry] = []
    doc = []
    seen: set[str] = set()
    platform = Platform.host()
    for tag, layers in images.items():
        paths, diff_ids = [], []
        for raw in layers:
            hexd = hashlib.sha256(raw).hexdigest()
            if hexd not in seen:
                seen.add(hexd)
                entries += [d(hexd), f(f"{hexd}/layer.tar", raw)]
            paths.append(f"{hexd}/layer.tar")
            diff_ids.append(f"sha256:{hexd}")
        config = {
            "architecture": platform.architecture,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        raw_config = json.dumps(config).encode()
        name = hashlib.sha256(raw_config).hexdigest() + ".json"
        entries.append(f(name, raw_config))
        doc.append({"Config": name, "RepoTags": [tag], "Layers": paths, **manifest})
    entries += extra or []
    entries.append(f("manifest.json", json.dumps(doc).encode()))
    return tb.build_tar(entries)


UNPACK_CASES = [
    "up-and-out symlink parent",
    "escaping symlink across layers",
    "symlink named .",
    "hardlink to an absolute host path",
    "whiteout of ..",
    "whiteout through an escaping symlink",
    "huge declared size on a short stream",
    "truncated in the data",
    "PAX length too long",
    "dotdot in PAX path",
    "hardlink to a symlink, then chmod (CVE-2021-32760)",
    "absolute symlink across layers is confined",
    "whiteout through an absolute symlink is confined",
    "opaque whiteout clears only its own directory",
]


@pytest.mark.integration
def test_imgci_unpack_of_hostile_layers(imgci: Imgci, tmp_path: Path) -> None:
    """Hostile layers come in through ``imgci load`` (which stores layers without extracting them), then
    ``imgci unpack`` must refuse them cleanly or keep them inside the target."""
    cases = [c for c in CASES if c.name in UNPACK_CASES]
    assert len(cases) == len(UNPACK_CASES)
    boxes = [Sandbox.make(tmp_path / "boxes" / str(n)) for n in range(len(cases))]
    images = {f"localhost/evil/case{n}:1": [_tar(layer, boxes[n]) for layer in c.layers] for n, c in enumerate(cases)}
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_docker_archive(images))
    imgci.run("load", "-i", str(archive))
    before = [box.snapshot() for box in boxes]
    for n, (case, box) in enumerate(zip(cases, boxes, strict=True)):
        args = ("unpack", f"localhost/evil/case{n}:1", "-o", str(box.target))
        if case.error is None:
            imgci.run(*args)
            assert case.check is None or case.check(box.target, box), case.name
        else:
            err = imgci.fails(*args)
            assert case.mentions in err, (case.name, err)
            # no half-written rootfs: the target is left as it was (empty), no unpack work dir beside it
            assert not any(box.target.iterdir()), case.name
            assert not [p for p in box.target.parent.iterdir() if ".unpack-" in p.name], case.name
        assert box.snapshot() == before[n], case.name


LOAD_CASES: list[tuple[str, Callable[[Sandbox, bytes], bytes], str]] = [
    ("dotdot entry", lambda b, good: _docker_archive(GOOD, [f("../../escape.json", b"{}")]), "'../../escape.json'"),
    (
        "manifest.json is a symlink to a host file",
        lambda b, good: tb.build_tar([sl("manifest.json", str(b.outside / "secret.txt"))]),
        "neither index.json nor manifest.json",
    ),
    (
        "layer is a symlink to a host file",
        lambda b, good: _docker_archive(
            GOOD, [sl("l/layer.tar", str(b.outside / "secret.txt"))], Layers=["l/layer.tar"]
        ),
        "lacks layer",
    ),
    (
        "layer is a hardlink to a host file",
        lambda b, good: _docker_archive(
            GOOD, [hl("l/layer.tar", "../../../" + str(b.outside / "secret.txt"))], Layers=["l/layer.tar"]
        ),
        "lacks layer",
    ),
    (
        "config path climbs out",
        lambda b, good: _docker_archive(GOOD, Config="../../../up1/up2/outside/secret.txt"),
        "lacks the image config '../../../up1/up2/outside/secret.txt'",
    ),
    (
        "layer path is absolute",
        lambda b, good: _docker_archive(GOOD, Layers=[str(b.outside / "secret.txt")]),
        "lacks layer",
    ),
    ("truncated", lambda b, good: good[: len(good) // 2 + 100], "truncated"),
    ("bad PAX length", lambda b, good: _pax(b"99 path=x\n", [f("x")]) + good, "PAX"),
    ("PAX key with NUL", lambda b, good: _pax({"a\0b": b"1"}) + good, "PAX"),
    ("huge declared size", lambda b, good: tb.build_tar([f("big.json", b"{}", size=1 << 40)]), "too large"),
    ("huge size beyond int64", lambda b, good: _with_base256(f("x", b"abc"), 124, 12, 1 << 80), "size"),
]
GOOD = {"localhost/good:1": [tb.build_tar([f("etc/hello", b"hi")])]}


@pytest.mark.integration
def test_imgci_load_of_hostile_archives(imgci: Imgci, tmp_path: Path) -> None:
    """``imgci load`` never writes an archive path to disk nor reads a host file through an archive link."""
    box = Sandbox.make(tmp_path / "box")
    good = _docker_archive(GOOD)
    before = box.snapshot()
    for name, make, mentions in LOAD_CASES:
        archive = tmp_path / "hostile.tar"
        archive.write_bytes(make(box, good))
        err = imgci.fails("load", "-i", str(archive))
        assert mentions in err, (name, err)
        assert box.snapshot() == before, name
    for path in imgci.state.rglob("*"):  # the secret never reached the store, compressed or not
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert SECRET not in data and SECRET not in _gunzip(data), path
    assert box.snapshot() == before


def _gunzip(data: bytes) -> bytes:
    try:
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else b""
    except (OSError, EOFError):
        return b""


# -- end to end: ADD of a local archive and COPY in imgci build ------------------------------------------------------
def _context(path: Path, dockerfile: str, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    for name, data in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


ADD_FAILS: list[tuple[str, list[Entry] | bytes, str]] = [
    ("dotdot entry", [f("../../canary.txt", b"p")], "'../../canary.txt' is outside extraction root"),
    ("dotdot in PAX path", _pax({"path": b"a/../../x"}), "'a/../../x' is outside extraction root"),
    ("hardlink to ..", [f("a", b"x"), hl("h", "../../../canary.txt")], "outside extraction root"),
    ("hardlink to an absolute host path", [hl("h", "@CANARY@")], "hardlink 'h' to missing"),
    ("whiteout entry", [f("etc/.wh.passwd")], "names starting with .wh."),
    ("opaque entry", [f("etc/.wh..wh..opq")], "names starting with .wh."),
    ("huge declared size", [f("big", b"abc", size=1 << 40)], "truncated"),
    ("truncated in the data", _truncated(1024, [d("a"), f("a/b", b"x" * 3000)]), "truncated"),
    ("PAX key with NUL", tb.build_tar([f("first")])[:-1024] + _pax({"a\0b": b"1"}), "NUL in keyword"),
    ("device numbers beyond a header", _with_base256(tb.char_device("c"), 329, 8, 1 << 40), "'c' has ids or device"),
    ("negative uid", _with_base256(f("neg", b"x"), 108, 8, -5), "'neg' has ids or device"),
]


@pytest.mark.integration
def test_add_of_hostile_archives_fails_cleanly(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    box = Sandbox.make(tmp_path / "box")
    before = box.snapshot()
    for n, (name, layer, mentions) in enumerate(ADD_FAILS):
        ctx = _context(tmp_path / f"ctx{n}", f"FROM {busybox}\nADD evil.tar /dst/\n", {"evil.tar": _tar(layer, box)})
        err = imgci.fails("build", "-t", f"evil:{n}", str(ctx))
        assert mentions in err and "evil.tar" in err, (name, err)
        assert box.snapshot() == before, name


ADD_SAFE: list[Entry] = [
    sl(".", "@OUT@"),  # a symlink named '.': skipped (BuildKit cleans the name to the destination itself)
    sl("./", "/"),
    sl("l", "@OUT@"),
    f("l/secret.txt", b"inside"),  # through an absolute link: inside the image
    sl("up", "../../../../.."),
    f("up/top.txt", b"top"),  # '..' stops at the image root, as in a chroot
    sl("s", "@OUT@/secret.txt"),
    hl("h", "s", mode=0o4777),  # a hardlink to a symlink, then its mode (CVE-2021-32760)
    d("var"),
    sl("var/run", "/run"),
    d("usr/lib"),
    sl("lib", "usr/lib"),
    f("lib/x.so", b"elf"),
    sl("a/b/c", "../../x"),
    tb.char_device("dev/null", 1, 3),
]


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["overlay", "native"])
def test_add_of_an_archive_with_escaping_links_stays_inside(
    imgci: Imgci, busybox: str, tmp_path: Path, backend: str
) -> None:
    box = Sandbox.make(tmp_path / "box")
    out = str(box.outside)
    ctx = _context(
        tmp_path / "ctx",
        f"""
        FROM {busybox}
        ADD safe.tar /dst/
        RUN test "$(cat {out}/secret.txt)" = inside && test "$(cat /top.txt)" = top && test -L /dst/h \\
            && test "$(readlink /dst/var/run)" = /run && test "$(cat /dst/usr/lib/x.so)" = elf && test -L /dst/lib \\
            && test "$(readlink /dst/a/b/c)" = ../../x && echo confined > /dst/s-written
        """,
        {"safe.tar": _tar(ADD_SAFE, box)},
    )
    before = box.snapshot()
    imgci.run("build", "-b", backend, "--no-cache", "-t", "safe:1", str(ctx))
    assert box.snapshot() == before
    rootfs = tmp_path / "rootfs"
    imgci.run("unpack", "safe:1", "-o", str(rootfs))
    assert (rootfs / out.lstrip("/") / "secret.txt").read_bytes() == b"inside"
    assert (rootfs / "top.txt").read_bytes() == b"top"
    assert os.readlink(rootfs / "dst/s") == f"{out}/secret.txt" and (rootfs / "dst/h").is_symlink()
    assert box.snapshot() == before


@pytest.mark.integration
def test_copy_of_a_context_with_symlinks_pointing_out(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    """Symlinks in the build context are copied as links, resolved inside the context (never on the host) when
    named as a source, and never followed by the sandbox onto the host (kaniko's path traversal)."""
    box = Sandbox.make(tmp_path / "box")
    ctx = _context(
        tmp_path / "ctx",
        f"""
        FROM {busybox}
        COPY . /ctx/
        RUN test -L /ctx/out-abs && ! cat /ctx/out-abs/secret.txt && ! cat /ctx/out-rel/secret.txt \\
            && ! cat /ctx/sub/deep && ! test -e {box.outside}
        """,
        {"a.txt": b"a"},
    )
    (ctx / "out-abs").symlink_to(box.outside)
    (ctx / "out-rel").symlink_to(os.path.relpath(box.outside, ctx))
    (ctx / "out-file").symlink_to(box.canary)
    (ctx / "sub").mkdir()
    (ctx / "sub/deep").symlink_to(os.path.relpath(box.outside / "secret.txt", ctx / "sub"))
    before = box.snapshot()
    imgci.run("build", "-t", "ctx:1", str(ctx))
    rootfs = tmp_path / "rootfs"
    imgci.run("unpack", "ctx:1", "-o", str(rootfs))
    assert os.readlink(rootfs / "ctx/out-abs") == str(box.outside)
    assert os.readlink(rootfs / "ctx/sub/deep") == os.readlink(ctx / "sub/deep")
    for path in rootfs.rglob("*"):
        assert path.is_symlink() or not path.is_file() or SECRET not in path.read_bytes(), path
    relative = os.path.relpath(box.canary, ctx)
    for n, (source, mentions) in enumerate(
        [
            ("out-abs/secret.txt", "not found in build context"),
            ("out-rel/secret.txt", "not found in build context"),
            ("out-file", "not found in build context"),
            ("sub/deep", "not found in build context"),
            (relative, "outside the build context"),
        ]
    ):
        (ctx / "Dockerfile").write_text(f"FROM {busybox}\nCOPY {source} /x\n")
        err = imgci.fails("build", "-t", f"ctx-fail:{n}", str(ctx))
        assert mentions in err and source in err, (source, err)
    assert box.snapshot() == before
    for path in imgci.state.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert SECRET not in data and SECRET not in _gunzip(data), path


# -- end to end: devices when unprivileged, as a real unprivileged user -----------------------------------------------
@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="runs imgci as the user imgci-rootless (the tests run as root in CI)")
def test_imgci_unpack_as_an_unprivileged_user_skips_devices(tmp_path: Path) -> None:
    from tests.integration.rootless import RootlessUser

    user = RootlessUser.create(tmp_path / "rootless")
    home = user.private_dir()
    try:
        box, box2 = Sandbox.make(home / "box"), Sandbox.make(home / "box2")
        for p in [home, *home.rglob("*")]:
            os.chown(p, user.uid, user.gid, follow_symlinks=False)
        devices = [d("dev"), tb.char_device("dev/null", 1, 3), tb.block_device("dev/sda", 8, 0), f("etc/ok", b"ok")]
        tb.make_tar(home / "devices.tar", devices)
        tb.make_tar(home / "escape.tar", [sl("dev", "../outside"), tb.char_device("dev/null", 1, 3)])
        state = home / "state"
        user.imgci("import", str(home / "devices.tar"), "localhost/devices:1", state=state)
        user.imgci("import", str(home / "escape.tar"), "localhost/escape:1", state=state)
        before, before2 = box.snapshot(), box2.snapshot()
        env = {"IMGCI_STATE": str(state)}
        proc = user.run([user.python, "-m", "imgci", "unpack", "localhost/devices:1", "-o", str(box.target)], env=env)
        assert "warning: skipped device node 'dev/null' (unprivileged)" in proc.stderr.decode()
        assert (box.target / "etc/ok").read_bytes() == b"ok"
        assert not os.path.lexists(box.target / "dev/null") and not os.path.lexists(box.target / "dev/sda")
        assert box.snapshot() == before
        argv = [user.python, "-m", "imgci", "unpack", "localhost/escape:1", "-o", str(box2.target)]
        proc = user.run(argv, env=env, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err and "error: " in err and "'dev/null'" in err, err
        assert box2.snapshot() == before2
    finally:
        shutil.rmtree(home, ignore_errors=True)
