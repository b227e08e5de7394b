"""The sandbox child (``python -m imgci._sandbox``): runs one RUN step, or removes paths, inside namespaces.

Contract (the parent side is :mod:`imgci.build.sandbox.launcher`):
- stdin: one line, the :class:`ChildSpec` JSON; in ``userns`` isolation the child then unshares its namespaces,
  reports ``{"event": "maps", "pid": N}`` and waits for a line ``go`` (the parent has written its uid/gid maps).
- stdout: JSON lines (:func:`imgci.build.sandbox.spec.event`): ``warning``, ``exit`` (the command's status),
  ``layer`` (diff_id, entries of the tar it streamed), ``error`` (message), and ``done`` last.
- ``spec.output_fd``: the command's stdout and stderr; ``spec.tar_fd``: the layer tar (uncompressed), written only if
  the command succeeded (closed empty otherwise).
- The process tree: this process (S) sets up the root file system in its own mount namespace, forks the command's
  process (P) into a new pid namespace, where P takes a private mount namespace of its own for /proc, /dev,
  /etc/hosts, /etc/resolv.conf and the RUN mounts, pivots into the root file system, drops to the step's user and
  execs. Nothing P mounted is visible to S, and when P (pid 1 of its namespace) exits every process it left dies.
  Mount points P needed that the image lacks are created by S beforehand and removed after (parent directory
  mtimes restored), so they never appear in the layer.
- The work directory (overlay upper/work/merged or the native rootfs) is removed before the child exits, except the
  upper directory of a successful overlay step, which becomes the snapshot of the new layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from imgci.build.sandbox import libc
from imgci.build.sandbox.spec import ChildSpec, MountSpec, ProcessSpec, event
from imgci.errors import ImgciError

_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class ChildError(Exception):
    """A failure to set up the sandbox, reported to the parent as an ``error`` event."""


def _report(kind: str, **fields: Any) -> None:
    sys.stdout.write(event(kind, **fields))
    sys.stdout.flush()


# -- namespaces ------------------------------------------------------------------------------------------------
def _enter_namespaces(spec: ChildSpec) -> bool:
    """Unshare what the isolation mode allows; returns whether this process may mount."""
    net = libc.CLONE_NEWNET if spec.network == "none" else 0
    if spec.isolation == "userns":
        libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | net)
        _report("maps", pid=os.getpid())
        if sys.stdin.readline().strip() != "go":
            raise ChildError("the build process did not map the sandbox's user ids")
        if spec.id_kind != "single":
            os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        can_mount = True
    else:
        can_mount = True
        try:
            libc.unshare(libc.CLONE_NEWNS)
        except OSError:
            can_mount = False
        for flag in (libc.CLONE_NEWIPC, libc.CLONE_NEWUTS):
            with contextlib.suppress(OSError):
                libc.unshare(flag)
        if net:
            try:
                libc.unshare(net)
            except OSError as e:
                raise ChildError(f"--network=none needs a network namespace, which is not allowed here: {e}") from e
    if can_mount:
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    if net:
        _loopback_up()
    return can_mount


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


# -- the root file system ----------------------------------------------------------------------------------------
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
            self._remember_parents(root, parts)
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

    def _remember_parents(self, root: Any, parts: list[str]) -> None:
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
            fd = _open_dir_nofollow(self.path, parent)
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
            fd = _open_dir_nofollow(self.path, rel)
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


def _open_dir_nofollow(root: Path, rel: str) -> int | None:
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


def _mount_points(spec: ChildSpec) -> list[tuple[str, bool, bool]]:
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
def _secure_target(root: Path, target: str) -> str:
    """A ``/proc/self/fd/N`` path for mount point ``target`` resolved inside ``root`` (never through a symlink out)."""
    from imgci.rootdir import RootDir

    parts = [p for p in target.split("/") if p]
    r = RootDir(root)
    try:
        opened = r.walk(parts[:-1], create=False, follow=True, entry=target)
        if opened is None:
            raise ChildError(f"mount point {target} is missing")
        fd, _ = opened
        try:
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                tfd = os.open(parts[-1], flags, dir_fd=fd)
            except OSError as e:
                raise ChildError(f"mount point {target}: {e.strerror}") from None
        finally:
            os.close(fd)
    finally:
        r.close()
    if stat.S_ISLNK(os.fstat(tfd).st_mode):
        os.close(tfd)
        raise ChildError(f"mount point {target} is a symbolic link")
    os.set_inheritable(tfd, False)
    return f"/proc/self/fd/{tfd}"


def _secure_source(base: Path, rel: str) -> str:
    """A ``/proc/self/fd/N`` path for ``rel`` under ``base``, refusing any symlink on the way."""
    fd = _open_dir_nofollow(base, rel.rpartition("/")[0])
    if fd is None:
        raise ChildError(f"bind mount source {rel} is not a directory path without symlinks")
    try:
        tfd = os.open(rel.rpartition("/")[2] or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    if stat.S_ISLNK(os.fstat(tfd).st_mode):
        os.close(tfd)
        raise ChildError(f"bind mount source {rel} is a symbolic link")
    return f"/proc/self/fd/{tfd}"


def _setup_dev(root: Path, process: ProcessSpec) -> None:
    dev = root / "dev"
    libc.mount("tmpfs", _secure_target(root, "/dev"), "tmpfs", libc.MS_NOSUID, "mode=755,size=65536k")
    for name in _DEVICES:
        host = Path("/dev") / name
        if not host.exists():
            continue
        (dev / name).touch(mode=0o666)
        libc.mount(str(host), str(dev / name), None, libc.MS_BIND)
    (dev / "pts").mkdir()
    try:
        libc.mount(
            "devpts", str(dev / "pts"), "devpts", libc.MS_NOSUID | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"
        )
        os.symlink("pts/ptmx", dev / "ptmx")
    except OSError:
        pass  # no pseudo-terminals: a RUN rarely needs one
    (dev / "shm").mkdir(mode=0o1777)
    os.chmod(dev / "shm", 0o1777)
    libc.mount("shm", str(dev / "shm"), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777,size=65536k")
    (dev / "mqueue").mkdir()
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, dev / name)
    if process.files:
        pipes = dev / "pipes"
        pipes.mkdir(mode=0o755)
        for path, hexdata, mode in process.files:
            name = path.rpartition("/")[2]
            f = pipes / name
            f.write_bytes(bytes.fromhex(hexdata))
            os.chmod(f, mode)


def _setup_mounts(spec: ChildSpec, root: Path, warnings: list[str]) -> None:
    assert spec.process is not None
    try:
        libc.mount("proc", _secure_target(root, "/proc"), "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    except OSError:
        libc.mount("/proc", _secure_target(root, "/proc"), None, libc.MS_BIND | libc.MS_REC)
        warnings.append("could not mount a fresh /proc; the host's /proc is bound instead")
    _setup_dev(root, spec.process)
    try:
        libc.mount(
            "sysfs",
            _secure_target(root, "/sys"),
            "sysfs",
            libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC,
        )
    except OSError:
        with contextlib.suppress(OSError):
            libc.mount("/sys", _secure_target(root, "/sys"), None, libc.MS_BIND | libc.MS_REC)
    private = Path(spec.work_dir) / "private"  # a tmpfs only P's mount namespace sees
    private.mkdir(exist_ok=True)
    libc.mount("tmpfs", str(private), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=700,size=16m")
    for name, content in (("hosts", spec.hosts), ("resolv.conf", spec.resolv)):
        if os.path.islink(root / "etc" / name) or os.path.islink(root / "etc"):
            warnings.append(f"/etc/{name} is a symbolic link in the image; the builder's {name} is not mounted")
            continue
        f = private / name
        f.write_text(content)
        os.chmod(f, 0o644)
        libc.mount(str(f), _secure_target(root, f"/etc/{name}"), None, libc.MS_BIND)
        libc.mount(None, _secure_target(root, f"/etc/{name}"), None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
    for n, m in enumerate(spec.mounts):
        _mount_one(m, n, root, private)


def _mount_one(m: MountSpec, n: int, root: Path, private: Path) -> None:
    if m.kind == "secret":
        if not m.target:
            return
        f = private / f"secret-{n}"
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes.fromhex(m.data))
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode)
        finally:
            os.close(fd)
        target = _secure_target(root, m.target)
        libc.mount(str(f), target, None, libc.MS_BIND)
        libc.mount(
            None,
            _secure_target(root, m.target),
            None,
            libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV,
        )
        return
    if m.kind == "tmpfs":
        opts = f"mode={m.mode:o}" + (f",size={m.size}" if m.size else "")
        libc.mount("tmpfs", _secure_target(root, m.target), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, opts)
        return
    source = m.source
    if m.kind == "bind" and m.subpath:
        source = _secure_source(Path(m.source), m.subpath)
    target = _secure_target(root, m.target)
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    if m.readonly:
        flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
        try:
            libc.mount(None, _secure_target(root, m.target), None, flags)
        except OSError:
            libc.mount(None, _secure_target(root, m.target), None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)


def _exec_command(spec: ChildSpec, root: Path, can_mount: bool) -> None:
    """P: finish the sandbox and exec the command. Never returns; reports failures on the output fd."""
    process = spec.process
    assert process is not None
    warnings: list[str] = []
    try:
        with contextlib.suppress(OSError):
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if can_mount:
            libc.unshare(libc.CLONE_NEWNS)
            libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
            _setup_mounts(spec, root, warnings)
            os.chdir(root)
            libc.pivot_root(".", ".")
            libc.umount(".", libc.MNT_DETACH)
        else:
            os.chroot(root)
        os.chdir("/")
        with contextlib.suppress(OSError):
            libc.sethostname(process.hostname)
        env = dict(e.partition("=")[::2] for e in process.env)
        try:
            os.chdir(process.cwd)
        except OSError as e:
            raise ChildError(f"cannot change to the working directory {process.cwd}: {e.strerror}") from None
        if spec.id_kind != "single":
            os.setgroups(process.groups)
        try:
            os.setresgid(process.gid, process.gid, process.gid)
            os.setresuid(process.uid, process.uid, process.uid)
        except OSError as e:
            raise ChildError(
                f"cannot switch to user {process.uid}:{process.gid} ({e.strerror}): this build maps only one user id"
                " — give the invoking user a subordinate id range in /etc/subuid and /etc/subgid"
            ) from None
        os.umask(0o022)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(spec.output_fd, 1)
        os.dup2(spec.output_fd, 2)
        os.closerange(3, _max_fd())
        for w in warnings:
            os.write(2, f"imgci: warning: {w}\n".encode())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            os.execvpe(process.args[0], process.args, env)
        except OSError as e:
            os.write(2, f"{process.args[0]}: {e.strerror}\n".encode())
            os._exit(127 if isinstance(e, FileNotFoundError) else 126)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(spec.output_fd if spec.output_fd >= 0 else 2, f"imgci: sandbox: {e}\n".encode())
        os._exit(125)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


# -- S: the whole step --------------------------------------------------------------------------------------------
class _HashFd:
    """A tar sink writing to a file descriptor while hashing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hash = hashlib.sha256()

    def write(self, data: memoryview, /) -> int:
        self.hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)


def run(spec: ChildSpec) -> int:
    from imgci.build.layer import plan_entries, write_tar
    from imgci.build.sandbox import snapshots

    can_mount = _enter_namespaces(spec)
    if spec.backend == "overlay" and not can_mount:
        raise ChildError("the overlay snapshotter needs mounts, which are not allowed here; use --backend native")
    work = Path(spec.work_dir)
    try:
        rootfs = Rootfs(spec, can_mount)
        for w in rootfs.warnings:
            _report("warning", message=w)
        before = snapshots.scan(rootfs.path) if spec.backend == "native" else {}
        assert spec.process is not None
        _ensure_workdir(rootfs.path, spec.process.cwd)
        _init_caches(spec)
        _prepare_binds(spec, rootfs)
        placements = None
        if can_mount:
            for target, is_dir, keep in _mount_points(spec):
                rootfs.stub(target, is_dir, keep)
        else:
            from imgci.build.sandbox.nomount import place_all

            notes: list[str] = []
            placements = place_all(spec, rootfs, notes)
            for w in notes:
                _report("warning", message=w)
        pid_ns = False
        try:
            libc.unshare(libc.CLONE_NEWPID)
            pid_ns = True
        except OSError:
            with contextlib.suppress(OSError):
                libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        pid = os.fork()
        if pid == 0:
            if not pid_ns:
                os.setpgid(0, 0)
            _exec_command(spec, rootfs.path, can_mount)
        os.close(spec.output_fd)
        status = _wait(pid, pid_ns)
        code = os.waitstatus_to_exitcode(status)
        _report("exit", code=code)
        if placements is not None:
            placements.undo()
        rootfs.remove_stubs()
        if code != 0:
            os.close(spec.tar_fd)
            return 0
        if spec.backend == "overlay":
            libc.umount(str(rootfs.path))
            entries = snapshots.diff_upper(rootfs.upper, rootfs.lowers, rootfs.flavor)
            top = rootfs.upper
        else:
            if can_mount:
                libc.umount(str(rootfs.path), libc.MNT_DETACH)
            entries = snapshots.diff_native(rootfs.path, before, rootfs.crcs)
            top = rootfs.path
        sink = _HashFd(spec.tar_fd)
        writer = write_tar(plan_entries(entries, spec.epoch), sink)
        os.close(spec.tar_fd)
        diff_id = "sha256:" + sink.hash.hexdigest()
        _report("layer", diff_id=diff_id, entries=writer.entries, changes=len(entries))
        if spec.backend == "overlay":
            final = Path(spec.snapshot_dir) / diff_id.split(":")[1]
            try:
                os.rename(top, final)
            except OSError:
                pass  # the same layer exists already (an identical step ran elsewhere)
        return 0
    finally:
        with contextlib.suppress(OSError):
            os.chdir("/")
        if can_mount:
            for sub in ("merged", "rootfs"):
                with contextlib.suppress(OSError):
                    libc.umount(str(work / sub), libc.MNT_DETACH)
        snapshots.remove_tree(work)


def _init_caches(spec: ChildSpec) -> None:
    """A cache mount's directory gets its ``mode``/``uid``/``gid`` when it is new (empty), as BuildKit creates it."""
    for m in spec.mounts:
        if m.kind != "cache":
            continue
        path = Path(m.source)
        with contextlib.suppress(OSError):
            if not any(path.iterdir()):
                os.chown(path, m.uid, m.gid)
                os.chmod(path, m.mode)


def _prepare_binds(spec: ChildSpec, rootfs: Rootfs) -> None:
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


def _ensure_workdir(root: Path, cwd: str) -> None:
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


def _wait(pid: int, pid_ns: bool) -> int:
    """Wait for P; kill it when told to or when the build process goes away (EOF on stdin). Without a pid
    namespace, S is a subreaper and kills every process the step left behind, daemons included. (No threads:
    after unshare(CLONE_NEWPID) this process cannot start one.)"""
    import select

    def kill() -> None:
        with contextlib.suppress(OSError):
            if pid_ns:
                os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: everything in it dies too
            else:
                os.killpg(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda signum, frame: kill())
    signal.signal(signal.SIGINT, lambda signum, frame: kill())
    stdin = sys.stdin.fileno()
    watching = True
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except InterruptedError:
            continue
        if done:
            break
        if not watching:
            time.sleep(0.05)
            continue
        try:
            readable, _, _ = select.select([stdin], [], [], 0.05)
            if readable and not os.read(stdin, 4096):
                kill()  # the build process is gone
                watching = False
        except (OSError, ValueError):
            watching = False
    if not pid_ns:
        _reap_descendants()
    return status


def _reap_descendants() -> None:
    """Kill and reap every process re-parented to this subreaper (what a RUN left running)."""
    me = os.getpid()
    for _ in range(100):
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                children.append(int(entry))
        if not children:
            return
        for child in children:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(child, 0)


def remove(spec: ChildSpec) -> int:
    from imgci.build.sandbox import snapshots

    if spec.isolation == "userns":
        _enter_namespaces(ChildSpec(action="remove", isolation="userns", id_kind=spec.id_kind))
    for path in spec.remove:
        snapshots.remove_tree(Path(path))
    return 0


def main() -> NoReturn:
    line = sys.stdin.readline()
    try:
        spec = ChildSpec.loads(line)
        code = remove(spec) if spec.action == "remove" else run(spec)
    except (ChildError, ImgciError, OSError) as e:
        _report("error", message=str(e))
        code = 1
    _report("done")
    os._exit(code)  # nothing to tear down: skip the interpreter's shutdown (~10 ms a step)
