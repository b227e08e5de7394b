"""Overlay snapshots of layers (imgci.build.sandbox.snapshots), made directly as root (as the sandbox child is
root in its namespace): a hardlink to a lower layer's file."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from imgci.build.sandbox.snapshots import ensure_snapshot
from imgci.build.sandbox.spec import LayerRef


def _layer(tmp_path: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> LayerRef:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    raw = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(raw)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return LayerRef(str(path), digest, digest)  # uncompressed: blob digest = diff_id


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o640, 1_650_000_000
    return info, data


def test_a_hardlink_to_a_lower_layers_file_becomes_a_copy_of_the_visible_one(tmp_path: Path) -> None:
    snaps = tmp_path / "snapshots"
    bottom = _layer(tmp_path, "bottom.tar", [_file("etc/a", b"from the bottom\n")])
    link = tarfile.TarInfo("etc/b")
    link.type, link.linkname = tarfile.LNKTYPE, "etc/a"
    top = _layer(tmp_path, "top.tar", [(link, b"")])
    low, _ = ensure_snapshot(snaps, bottom, [], flavor="trusted")
    high, _ = ensure_snapshot(snaps, top, [low], flavor="trusted")
    copy = high / "etc" / "b"
    assert copy.read_bytes() == b"from the bottom\n"
    assert not copy.is_symlink() and copy.stat().st_nlink == 1 and copy.stat().st_mode & 0o777 == 0o640
    assert not (high / "etc" / "a").exists()  # only the link's own layer content is in the snapshot
    # a lower whiteout hides the file: the link cannot be made from it
    gone = tarfile.TarInfo("etc/.wh.a")
    hidden, _ = ensure_snapshot(snaps, _layer(tmp_path, "gone.tar", [(gone, b"")]), [low], flavor="trusted")
    with pytest.raises(Exception, match="does not exist"):
        ensure_snapshot(
            snaps, _layer(tmp_path, "again.tar", [(link, b""), _file("x", b"x")]), [hidden, low], flavor="trusted"
        )


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` with what a lower layer shows: type, mode, owner, mtime, content/target, xattrs."""
    import os
    import stat

    out: dict[str, tuple[object, ...]] = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            what: object = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(p)
        else:
            what = stat.S_IFMT(st.st_mode)
        names = os.listxattr(p, follow_symlinks=False)
        xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False)) for n in names))
        mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns  # a directory's: when its entries were made
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, mtime, what, xattrs)
    return out


def test_a_snapshot_linked_from_the_unpacked_layer_equals_the_extracted_one(tmp_path: Path) -> None:
    """The same layer, extracted from its blob and linked from the layer store's unpacked copy (a privileged unpack
    of a layer without whiteouts or devices): the same tree, and the files are the unpacked copy's inodes."""
    import os

    from imgci.build.layerindex import LayerIndexBuilder
    from imgci.layerfs import extract_layer_dir

    sym = tarfile.TarInfo("app/current")
    sym.type, sym.linkname, sym.mtime = tarfile.SYMTYPE, "v1", 1_600_000_000
    exe = _file("app/v1/run.sh", b"#!/bin/sh\necho hi\n")
    exe[0].mode, exe[0].uid, exe[0].gid = 0o4755, 1234, 5678
    exe[0].pax_headers = {"SCHILY.xattr.user.note": "kept"}
    hard = tarfile.TarInfo("app/v1/again.sh")
    hard.type, hard.linkname = tarfile.LNKTYPE, "app/v1/run.sh"
    folder = tarfile.TarInfo("app/v1")
    folder.type, folder.mode, folder.mtime, folder.uid = tarfile.DIRTYPE, 0o750, 1_500_000_000, 42
    layer = _layer(tmp_path, "copy.tar", [(folder, b""), exe, (hard, b""), (sym, b""), _file("etc/motd", b"hello\n")])
    unpacked = tmp_path / "layers" / "root"
    unpacked.mkdir(parents=True)
    with open(layer.blob, "rb") as f:
        extract_layer_dir(f, unpacked, LayerIndexBuilder().record, unprivileged=False)
    extracted, _ = ensure_snapshot(tmp_path / "extracted", layer, [], flavor="trusted")
    linked_ref = LayerRef(layer.blob, layer.digest, layer.diff_id, unpacked=str(unpacked))
    linked, stats = ensure_snapshot(tmp_path / "linked", linked_ref, [], flavor="trusted")
    assert stats is None  # nothing was extracted
    assert _tree(linked) == _tree(extracted)
    assert os.stat(linked / "app/v1/run.sh").st_ino == os.stat(unpacked / "app/v1/run.sh").st_ino


def test_a_missing_unpacked_copy_falls_back_to_extracting_the_blob(tmp_path: Path) -> None:
    """An unpacked directory that is gone (or cannot be listed) never yields an empty or partial snapshot."""
    layer = _layer(tmp_path, "one.tar", [_file("etc/motd", b"hello\n")])
    ref = LayerRef(layer.blob, layer.digest, layer.diff_id, unpacked=str(tmp_path / "gone" / "root"))
    snap, stats = ensure_snapshot(tmp_path / "snaps", ref, [], flavor="trusted")
    assert stats is not None  # extracted
    assert (snap / "etc" / "motd").read_bytes() == b"hello\n"
