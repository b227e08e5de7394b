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
