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
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from imgci.build.sandbox import libc
from imgci.build.sandbox.process import ChildError, exec_command
from imgci.build.sandbox.rootfs import Rootfs, ensure_workdir, init_caches, mount_points, prepare_binds
from imgci.build.sandbox.spec import ChildSpec, event
from imgci.errors import ImgciError


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
    from imgci.build.sandbox import diff, snapshots

    can_mount = _enter_namespaces(spec)
    if spec.backend == "overlay" and not can_mount:
        raise ChildError("the overlay snapshotter needs mounts, which are not allowed here; use --backend native")
    work = Path(spec.work_dir)
    try:
        rootfs = Rootfs(spec, can_mount)
        for w in rootfs.warnings:
            _report("warning", message=w)
        before = diff.scan(rootfs.path) if spec.backend == "native" else {}
        assert spec.process is not None
        ensure_workdir(rootfs.path, spec.process.cwd)
        init_caches(spec)
        prepare_binds(spec, rootfs)
        placements = None
        if can_mount:
            for target, is_dir, keep in mount_points(spec):
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
            exec_command(spec, rootfs.path, can_mount)
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
            entries = diff.diff_upper(rootfs.upper, rootfs.lowers, rootfs.flavor)
            top = rootfs.upper
        else:
            if can_mount:
                libc.umount(str(rootfs.path), libc.MNT_DETACH)
            entries = diff.diff_native(rootfs.path, before, rootfs.crcs)
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
    # P's exit wakes the select below at once (a SIGCHLD written to a wakeup pipe) instead of at the next poll:
    # a 50 ms poll cost a small step 25 ms on average.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    stdin = sys.stdin.fileno()
    watching = True
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except InterruptedError:
            continue
        if done:
            break
        try:
            readable, _, _ = select.select([stdin, wake_r] if watching else [wake_r], [], [], 0.5)
            if wake_r in readable:
                os.read(wake_r, 4096)
            if stdin in readable and not os.read(stdin, 4096):
                kill()  # the build process is gone
                watching = False
        except (OSError, ValueError):
            watching = False
            time.sleep(0.01)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(wake_r)
    os.close(wake_w)
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
