"""Tarballs for tests: a tiny busybox root filesystem, and hand-crafted (possibly hostile) archives.

Contract:

* :func:`make_busybox_rootfs_tar` writes a deterministic, uncompressed tar of a minimal Linux root
  filesystem built around the host's static busybox. Same inputs, same bytes.
* :func:`make_tar` / :func:`build_tar` write exactly the entries they are given, in order, with no
  normalisation at all: names like ``../x`` or ``/abs``, device nodes, whiteouts and declared sizes that
  disagree with the data are all kept as is. Headers come from ``TarInfo.tobuf``; the data blocks are
  written by hand so that a lying ``size`` produces a genuinely malformed archive.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

BUSYBOX = "/bin/busybox"
TarFormat = Literal[0, 1, 2]  # tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT
FIXED_MTIME = 1_700_000_000  # 2023-11-14; any fixed value keeps the output reproducible

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
ROOTFS_DIRS = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "tmp": 0o1777,
    "usr": 0o755,
    "usr/bin": 0o755,
    "var": 0o755,
}


@dataclass(frozen=True)
class TarEntry:
    """One archive member. ``size`` overrides the declared size (default: ``len(data)``)."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""
    size: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    mtime: int = FIXED_MTIME
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.mode = self.mode
        info.linkname = self.linkname
        info.size = len(self.data) if self.size is None else self.size
        info.uid, info.gid, info.uname, info.gname = self.uid, self.gid, self.uname, self.gname
        info.mtime = self.mtime
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.pax_headers = dict(self.pax_headers)
        return info


def file(name: str, data: bytes = b"", mode: int = 0o644, *, size: int | None = None, **kw: Any) -> TarEntry:
    """A regular file; ``size`` may lie about ``len(data)``."""
    return TarEntry(name, tarfile.REGTYPE, data, mode, size=size, **kw)


def directory(name: str, mode: int = 0o755, **kw: Any) -> TarEntry:
    """A directory."""
    return TarEntry(name, tarfile.DIRTYPE, mode=mode, **kw)


def symlink(name: str, target: str, **kw: Any) -> TarEntry:
    """A symbolic link to ``target`` (not checked or normalised)."""
    return TarEntry(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> TarEntry:
    """A hard link to the archive member ``target`` (which need not exist)."""
    return TarEntry(name, tarfile.LNKTYPE, linkname=target, **kw)


def char_device(name: str, major: int = 1, minor: int = 3, mode: int = 0o666, **kw: Any) -> TarEntry:
    """A character device node (default 1:3, /dev/null)."""
    return TarEntry(name, tarfile.CHRTYPE, mode=mode, devmajor=major, devminor=minor, **kw)


def block_device(name: str, major: int = 7, minor: int = 0, mode: int = 0o660, **kw: Any) -> TarEntry:
    """A block device node (default 7:0, /dev/loop0)."""
    return TarEntry(name, tarfile.BLKTYPE, mode=mode, devmajor=major, devminor=minor, **kw)


def fifo(name: str, mode: int = 0o644, **kw: Any) -> TarEntry:
    """A named pipe."""
    return TarEntry(name, tarfile.FIFOTYPE, mode=mode, **kw)


def whiteout(path: str) -> TarEntry:
    """The OCI whiteout deleting ``path``: an empty file ``dir/.wh.name``."""
    p = PurePosixPath(path)
    return file(str(p.parent / f".wh.{p.name}") if str(p.parent) != "." else f".wh.{p.name}")


def opaque_whiteout(directory_path: str) -> TarEntry:
    """The OCI opaque-directory marker ``dir/.wh..wh..opq``."""
    return file(f"{directory_path.rstrip('/')}/.wh..wh..opq")


def build_tar(
    entries: Iterable[TarEntry | tuple[tarfile.TarInfo, bytes]], fmt: TarFormat = tarfile.PAX_FORMAT
) -> bytes:
    """The archive bytes for ``entries`` in order, ended by two zero blocks. Raw ``(TarInfo, data)`` pairs
    are accepted for anything the helpers cannot express."""
    out = io.BytesIO()
    for entry in entries:
        info, data = (entry.tarinfo(), entry.data) if isinstance(entry, TarEntry) else entry
        out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        out.write(data)
        out.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def make_tar(
    path: str | Path,
    entries: Iterable[TarEntry | tuple[tarfile.TarInfo, bytes]],
    *,
    gzip: bool = False,
    fmt: TarFormat = tarfile.PAX_FORMAT,
) -> Path:
    """Write :func:`build_tar` to ``path`` (gzip-compressed with mtime 0 when ``gzip``); returns the path."""
    data = build_tar(entries, fmt)
    if gzip:
        data = gzip_module.compress(data, mtime=0)
    target = Path(path)
    target.write_bytes(data)
    return target


def busybox_applets(busybox: str = BUSYBOX) -> list[str]:
    """The applet names the given busybox binary provides, sorted."""
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({name for name in out.split() if name and "/" not in name and name != "busybox"})


def _parents(name: str) -> list[str]:
    parts = PurePosixPath(name).parts[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def make_busybox_rootfs_tar(
    path: str | Path,
    *,
    extra_files: Mapping[str, bytes] | None = None,
    busybox: str = BUSYBOX,
    mtime: int = FIXED_MTIME,
) -> Path:
    """Write a minimal root filesystem tar to ``path`` and return the path.

    Contents: ``bin/busybox`` (0755) and a relative symlink ``bin/<applet> -> busybox`` for every applet;
    ``etc/passwd`` (root, nobody), ``etc/group`` (root, nogroup); directories bin, dev, etc, proc, root
    (0700), tmp (1777), usr, usr/bin, var. ``extra_files`` maps relative paths to contents, mode 0644 (0755
    when the content starts with ``#!``), creating missing parent directories; they replace defaults of the
    same name. Everything is owned by 0:0 with mtime ``mtime``, sorted by name.
    """
    found = shutil.which(busybox)
    if found is None:
        raise FileNotFoundError(f"no executable busybox at {busybox}")
    binary = Path(found).read_bytes()
    files: dict[str, tuple[bytes, int]] = {
        "bin/busybox": (binary, 0o755),
        "etc/passwd": (PASSWD, 0o644),
        "etc/group": (GROUP, 0o644),
    }
    for name, content in (extra_files or {}).items():
        files[name.lstrip("/")] = (content, 0o755 if content.startswith(b"#!") else 0o644)
    dirs = dict(ROOTFS_DIRS)
    for name in files:
        for parent in _parents(name):
            dirs.setdefault(parent, 0o755)
    links = {f"bin/{applet}": "busybox" for applet in busybox_applets(found) if f"bin/{applet}" not in files}

    entries: list[TarEntry] = [directory(d, mode, mtime=mtime) for d, mode in dirs.items()]
    entries += [file(n, data, mode, mtime=mtime) for n, (data, mode) in files.items()]
    entries += [symlink(n, target, mtime=mtime) for n, target in links.items()]
    entries.sort(key=lambda e: e.name)
    return make_tar(path, entries)
