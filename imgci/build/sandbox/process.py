"""The command's process (P) of a RUN step: its private mounts, the pivot into the root file system, the user
switch and the exec (see ``child``).

Contract: :func:`exec_command` never returns. In its own mount namespace it mounts a fresh /proc, a minimal /dev,
/sys, the builder's /etc/hosts and /etc/resolv.conf and every ``RUN --mount`` (mount points resolved inside the
root through ``/proc/self/fd``), pivots into the root (or chroots, without mount permission), sets the hostname,
closes every file descriptor but stdio (/dev/null and the output), changes to its working directory (refusing
one outside the root), limits capabilities to Docker's default set (without CAP_SYS_CHROOT when the root is only
a chroot), drops to the step's uid/gid/groups and execs the command with umask 022 and exactly the step's
environment.
Failures before the exec are written to the output and exit with 125 (126/127 when the command cannot be run or
found, like a shell).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path

from imgci.build.sandbox import libc
from imgci.build.sandbox.rootfs import open_dir_nofollow
from imgci.build.sandbox.spec import ChildSpec, MountSpec, ProcessSpec

_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class ChildError(Exception):
    """A failure to set up the sandbox, reported to the build process as an ``error`` event."""


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
    fd = open_dir_nofollow(base, rel.rpartition("/")[0])
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


def exec_command(spec: ChildSpec, root: Path, can_mount: bool) -> None:
    """P: finish the sandbox and exec the command. Never returns; reports failures on the output fd."""
    process = spec.process
    assert process is not None
    warnings: list[str] = []
    report_fd = spec.output_fd if spec.output_fd >= 0 else 2
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
        # Only stdio may be open when the working directory is entered: the mount point and bind source
        # descriptors opened above (a bind source is a host directory) would otherwise be reachable as a WORKDIR
        # of /proc/self/fd/N, outside the root (runc CVE-2024-21626).
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(spec.output_fd, 1)
        os.dup2(spec.output_fd, 2)
        report_fd = 2
        os.closerange(3, _max_fd())
        try:
            os.chdir(process.cwd)
            inside = os.getcwd().startswith("/")  # "(unreachable)…", or ENOENT: a directory outside the root
        except OSError as e:
            raise ChildError(f"cannot change to the working directory {process.cwd}: {e.strerror}") from None
        if not inside:
            raise ChildError(f"the working directory {process.cwd} is outside the root file system")
        # Without pivot_root the root is only a chroot(2), which root with CAP_SYS_CHROOT leaves at will
        # (chroot into a subdirectory, climb out with "..", chroot there): the command does not get it.
        _limit_capabilities(DEFAULT_CAPABILITIES if can_mount else DEFAULT_CAPABILITIES - {CAP_SYS_CHROOT})
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
            os.write(report_fd, f"imgci: sandbox: {e}\n".encode())
        os._exit(125)


# Docker's (and BuildKit's) default capabilities: chown dac_override fowner fsetid kill setgid setuid setpcap
# net_bind_service net_raw sys_chroot mknod audit_write setfcap — no sys_admin, so a RUN cannot mount or unshare.
DEFAULT_CAPABILITIES = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
CAP_SYS_CHROOT = 18


def _limit_capabilities(keep: frozenset[int]) -> None:
    """Drop every capability outside ``keep`` from the bounding set and empty the inheritable and ambient sets:
    root's command gets exactly ``keep`` at exec (a set-uid program can gain no more), whatever this process had.
    (An inheritable capability survives root's exec whatever the bounding set says; Docker before 20.10.14 gave
    containers their whole set as inheritable, CVE-2022-24769.)"""
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        if cap not in keep:
            with contextlib.suppress(OSError):
                libc.prctl(libc.PR_CAPBSET_DROP, cap)
    libc.clear_inheritable_capabilities()


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


# -- S: the whole step --------------------------------------------------------------------------------------------
