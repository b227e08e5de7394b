"""The root file system of a RUN step, as the sandbox child (S) prepares and undoes it (see ``child``).

Contract: :class:`Rootfs` mounts the overlay of the step's snapshots (or materialises the native rootfs), creates
the mount points the command's process needs inside it — never through a symlink out of it — and removes them
afterwards with their parent directories' times restored, so they never reach the layer (except /proc, /dev and
/sys, which stay when the image lacked them, as in BuildKit). :func:`prepare_binds` gives every bind mount a host
directory; :func:`init_caches` sets a new cache mount's owner and mode.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from imgci.build.sandbox import libc
from imgci.build.sandbox.spec import ChildSpec, MountSpec
from imgci.errors import ImgciError


class Rootfs:
    """The step's root file system as S prepares it, and what S must undo afterwards."""

    def __init__(self, spec: ChildSpec, can_mount: bool) -> None:
        from imgci.build.sandbox import snapshots

        self.spec = spec
        self.work = Path(spec.work_dir)
        self.can_mount = can_mount
        self.flavor = "user" if spec.isolation == "userns" else "trusted"
        unprivileged = spec.id_kind == "single"
        self.warnings: list[str] = []
        self.lowers: list[Path] = []
        self.crcs: dict[str, int] = {}
        if spec.backend == "overlay":
            snaps = Path(spec.snapshot_dir)
            below: list[Path] = []
            for layer in spec.layers:
                path, stats = snapshots.ensure_snapshot(
                    snaps, layer, below, flavor=self.flavor, unprivileged=unprivileged
                )
                if stats is not None:
                    self.warnings += stats.warnings
                below.insert(0, path)
            self.lowers = _distinct(below)  # top first; overlayfs refuses a directory twice (an empty layer, say)
            self.upper, workdir, self.path = self.work / "upper", self.work / "work", self.work / "merged"
            for d in (self.upper, workdir, self.path):
                d.mkdir()
            links = self.work / "l"
            links.mkdir()
            names = []
            for n, lower in enumerate(self.lowers):
                os.symlink(lower, links / str(n))
                names.append(f"l/{n}")
            if not names:  # FROM scratch: an empty lower
                (self.work / "empty").mkdir()
                names.append("empty")
            opts = f"lowerdir={':'.join(names)},upperdir=upper,workdir=work"
            opts += ",userxattr" if self.flavor == "user" else ",index=off,metacopy=off,redirect_dir=off"
            os.chdir(self.work)  # short relative paths: mount options are limited to one page
            try:
                libc.mount("overlay", "merged", "overlay", 0, opts)
            finally:
                os.chdir("/")
        else:
            self.path = self.work / "rootfs"
            self.path.mkdir()
            stats, self.crcs = snapshots.materialise(self.path, spec.layers, unprivileged=unprivileged)
            self.warnings += stats.warnings
            if can_mount:
                libc.mount(str(self.path), str(self.path), None, libc.MS_BIND | libc.MS_REC)
        self.stubs: list[tuple[str, bool]] = []  # (path, is_dir) created as mount points, in creation order
        self.parent_times: dict[str, tuple[int, int]] = {}

    def stub(self, target: str, is_dir: bool, keep: bool = False) -> str:
        """Make sure mount point ``target`` exists (created inside the root, never through a symlink out); returns
        where it is, relative to the root. Unless ``keep``, what it created is removed by :meth:`remove_stubs`."""
        from imgci.rootdir import RootDir

        parts = [p for p in target.split("/") if p]
        if not parts:
            return ""
        created: list[str] = []
        root = RootDir(self.path, on_mkdir=created.append)
        try:
            self._remember_parents(parts)
            opened = root.walk(parts[:-1], create=True, follow=True, entry=target)
            assert opened is not None
            fd, names = opened
            try:
                rel = "/".join([*names, parts[-1]])
                try:
                    os.lstat(parts[-1], dir_fd=fd)
                except FileNotFoundError:
                    if is_dir:
                        os.mkdir(parts[-1], 0o755, dir_fd=fd)
                    else:
                        os.close(
                            os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
                        )
                    created.append(rel)
            finally:
                os.close(fd)
        finally:
            root.close()
        for path in created if not keep else []:
            self.stubs.append((path, os.path.isdir(self.path / path) and not os.path.islink(self.path / path)))
        return rel

    def _remember_parents(self, parts: list[str]) -> None:
        for n in range(len(parts) + 1):  # the target itself too: placements add files into existing directories
            rel = "/".join(parts[:n])
            if rel in self.parent_times:
                continue
            try:
                st = os.lstat(self.path / rel) if rel else os.lstat(self.path)
            except OSError:
                return
            if not stat.S_ISDIR(st.st_mode):
                return
            self.parent_times[rel] = (st.st_atime_ns, st.st_mtime_ns)

    def remove_stubs(self) -> None:
        """Undo :meth:`stub`: remove what was created (if still empty and still there), restore parent mtimes."""
        for rel, is_dir in reversed(self.stubs):
            parent, _, name = rel.rpartition("/")
            fd = open_dir_nofollow(self.path, parent)
            if fd is None:
                continue
            try:
                st = os.lstat(name, dir_fd=fd)
                if is_dir and stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(OSError):
                        os.rmdir(name, dir_fd=fd)
                elif not is_dir and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        for rel, (atime, mtime) in sorted(self.parent_times.items(), key=lambda kv: -kv[0].count("/")):
            fd = open_dir_nofollow(self.path, rel)
            if fd is None:
                continue
            try:
                os.utime(fd, ns=(atime, mtime))
            except OSError:
                pass
            finally:
                os.close(fd)


def _distinct(lowers: list[Path]) -> list[Path]:
    """Each lower once, where it is topmost: a layer over the same layer again changes nothing."""
    seen: set[Path] = set()
    out = []
    for low in lowers:
        if low not in seen:
            seen.add(low)
            out.append(low)
    return out


def open_dir_nofollow(root: Path, rel: str) -> int | None:
    """An fd of directory ``rel`` under ``root``, or None if a component is missing or not a real directory."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags)
    except OSError:
        return None
    for comp in [p for p in rel.split("/") if p]:
        try:
            nfd = os.open(comp, flags, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nfd
    return fd


def mount_points(spec: ChildSpec) -> list[tuple[str, bool, bool]]:
    """Every mount point P needs, as (path, is_dir, keep). As current BuildKit does, /proc, /dev and /sys stay in
    the layer when the image lacked them; /etc/hosts, /etc/resolv.conf and ``--mount`` targets do not."""
    points = [("/proc", True, True), ("/dev", True, True), ("/sys", True, True)]
    points += [("/etc/hosts", False, False), ("/etc/resolv.conf", False, False)]
    for m in spec.mounts:
        if m.kind == "secret" and not m.target:
            continue
        is_dir = m.kind in ("cache", "tmpfs") or (m.kind == "bind" and _bind_source_is_dir(m))
        points.append((m.target, is_dir, False))
    return points


def _bind_source_is_dir(m: MountSpec) -> bool:
    if not m.source:
        return True
    return os.path.isdir(os.path.join(m.source, m.subpath) if m.subpath else m.source)


# -- P: the command's process ------------------------------------------------------------------------------------
def init_caches(spec: ChildSpec) -> None:
    """A cache mount's directory gets its ``mode``/``uid``/``gid`` when it is new (empty), as BuildKit creates it."""
    for m in spec.mounts:
        if m.kind != "cache":
            continue
        path = Path(m.source)
        with contextlib.suppress(OSError):
            if not any(path.iterdir()):
                os.chown(path, m.uid, m.gid)
                os.chmod(path, m.mode)


def prepare_binds(spec: ChildSpec, rootfs: Rootfs) -> None:
    """Give every bind mount a host directory to bind: a stage/image as an overlay (writes go to a throw-away
    upper) or a copy, the build context directly (read-only) or under an overlay (``rw``)."""
    from imgci.build.sandbox import snapshots

    for n, m in enumerate(spec.mounts):
        if m.kind != "bind" or (not m.layers and (m.readonly or not rootfs.can_mount)):
            continue
        base = Path(spec.work_dir) / f"bind-{n}"
        base.mkdir()
        if m.layers and (spec.backend == "native" or not rootfs.can_mount):
            tree = base / "tree"
            tree.mkdir()
            snapshots.materialise(tree, m.layers, unprivileged=spec.id_kind == "single")
            m.source = str(tree)
            continue
        lowers: list[Path] = []
        if m.layers:
            below: list[Path] = []
            for layer in m.layers:
                path, _ = snapshots.ensure_snapshot(
                    Path(spec.snapshot_dir), layer, below, flavor=rootfs.flavor, unprivileged=spec.id_kind == "single"
                )
                below.insert(0, path)
            lowers = _distinct(below)
        else:
            lowers = [Path(m.source)]
        for d in ("upper", "work", "merged"):
            (base / d).mkdir()
        links = base / "l"
        links.mkdir()
        for i, low in enumerate(lowers):
            os.symlink(low, links / str(i))
        opts = f"lowerdir={':'.join(f'l/{i}' for i in range(len(lowers)))},upperdir=upper,workdir=work"
        opts += ",userxattr" if rootfs.flavor == "user" else ",index=off,metacopy=off,redirect_dir=off"
        os.chdir(base)
        try:
            libc.mount("overlay", "merged", "overlay", 0, opts)
        finally:
            os.chdir("/")
        m.source = str(base / "merged")


def ensure_workdir(root: Path, cwd: str) -> None:
    from imgci.rootdir import RootDir

    parts = [p for p in cwd.split("/") if p]
    if not parts:
        return
    r = RootDir(root)
    try:
        opened = r.walk(parts, create=True, follow=True, entry=cwd)
        if opened is not None:
            os.close(opened[0])
    except (OSError, ImgciError):
        pass  # P reports that it cannot change into it
    finally:
        r.close()
