"""The child side of the sandbox probes (``python -m imgci.build.sandbox.probe_child --child TEST DIR``).

Contract: one test per process, in directory DIR; the result is one JSON line ``{"ok": bool, "detail": str}`` on
stdout (see :mod:`imgci.build.sandbox.probe`, which starts these children and interprets them).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from imgci.build.sandbox import libc
from imgci.build.sandbox.idmap import FULL_RANGE, child_await_idmap
from imgci.build.sandbox.probe import read_proc

MODULE = "imgci.build.sandbox.probe_child"


class _ProbeFailed(Exception):
    pass


def _map_self(euid: int, egid: int) -> None:
    """Map root inside to ``euid``/``egid`` outside: what a process may write for itself after unsharing."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {euid} 1"), ("gid_map", f"0 {egid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise _ProbeFailed(f"writing /proc/self/{name} after unshare: {e.strerror}") from e


def _enter(userns: bool, extra: int = 0) -> None:
    """A private mount namespace (in a new user namespace mapping only ourselves, when ``userns``)."""

    euid, egid = os.geteuid(), os.getegid()
    libc.unshare(libc.CLONE_NEWNS | extra | (libc.CLONE_NEWUSER if userns else 0))
    if userns:
        _map_self(euid, egid)
    # never let a test mount propagate to the host's mount namespace
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def _test_userns(work: Path) -> str:

    euid, egid = os.geteuid(), os.getegid()
    try:
        libc.unshare(libc.CLONE_NEWUSER | libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS)
    except OSError as e:
        try:
            libc.unshare(libc.CLONE_NEWUSER)
        except OSError:
            raise e from None
        raise _ProbeFailed(f"unshare(CLONE_NEWUSER) works, but not with mount/pid/ipc/uts namespaces: {e.strerror}")
    _map_self(euid, egid)
    return "user, mount, pid, ipc and uts namespaces can be created and a self map written"


def _test_mount(work: Path, userns: bool) -> str:

    _enter(userns)
    target = work / "mnt"
    target.mkdir()
    libc.mount("tmpfs", str(target), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=1m")
    (target / "f").write_text("x")
    libc.umount(str(target))
    return f"tmpfs mounts work {'in a user namespace' if userns else 'in a private mount namespace'}"


def _test_overlay(work: Path, userns: bool) -> str:

    _enter(userns)
    lower, upper, wdir, merged = (work / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, wdir, merged):
        d.mkdir()
    (lower / "gone").write_text("lower\n")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("lower\n")
    opts = f"lowerdir={lower},upperdir={upper},workdir={wdir}" + (",userxattr" if userns else "")
    libc.mount("overlay", str(merged), "overlay", 0, opts)
    (merged / "new").write_text("upper\n")
    (merged / "gone").unlink()
    st = os.lstat(upper / "gone")
    if not (upper / "new").is_file() or not stat.S_ISCHR(st.st_mode) or st.st_rdev != 0:
        raise _ProbeFailed("overlay mounted, but deleting a lower file left no whiteout (char 0:0) in the upper dir")
    # a directory deleted and made again must hide the lower one: an opaque dir, which needs overlay's xattrs
    try:
        shutil.rmtree(merged / "dir")
        (merged / "dir").mkdir()
    except OSError as e:
        nested = "" if read_proc("/proc/self/uid_map") == f"0 0 {FULL_RANGE}" else " (root of a user namespace)"
        raise _ProbeFailed(f"re-creating a deleted directory (an opaque dir) failed{nested}: {e.strerror}")
    if os.listdir(merged / "dir"):
        raise _ProbeFailed("overlay mounted, but a re-created directory still shows the lower one (no opaque dirs)")
    libc.umount(str(merged))
    return f"overlay{' with userxattr' if userns else ''} mounts, writes whiteouts and opaque dirs"


def _test_proc(work: Path, userns: bool) -> str:

    _enter(userns, libc.CLONE_NEWPID)
    target = work / "proc"
    target.mkdir()
    r, w = os.pipe()
    pid = os.fork()  # the first child in the new pid namespace is its pid 1; only it can mount that namespace's proc
    if pid == 0:
        message = ""
        try:
            libc.prctl(libc.PR_SET_PDEATHSIG, 9)
            libc.mount("proc", str(target), "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
            if os.readlink(target / "self") != "1":
                message = "procfs mounted but shows another pid namespace"
        except OSError as e:
            message = e.strerror or str(e)
        os.write(w, message.encode() or b"-")
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    message = os.read(r, 4096).decode()
    if message != "-":
        raise _ProbeFailed(message or "the pid 1 child died")
    return f"a fresh /proc mounts in a new pid namespace{' inside a user namespace' if userns else ''}"


_CHILD_TESTS: dict[str, Callable[[Path], str]] = {
    "userns": _test_userns,
    "idmap": lambda w: child_await_idmap(),
    "mount": lambda w: _test_mount(w, True),
    "overlay": lambda w: _test_overlay(w, True),
    "proc": lambda w: _test_proc(w, True),
    "chroot-mount": lambda w: _test_mount(w, False),
    "chroot-overlay": lambda w: _test_overlay(w, False),
    "chroot-proc": lambda w: _test_proc(w, False),
}


def child_main(argv: list[str]) -> int:
    """``--child TEST [DIR]``: run one test, print ``{"ok": bool, "detail": str}``."""
    if len(argv) < 2 or argv[0] != "--child" or argv[1] not in _CHILD_TESTS:
        print(f"usage: python -m {MODULE} --child {{{','.join(_CHILD_TESTS)}}} DIR", file=sys.stderr)
        return 2
    try:
        report = {"ok": True, "detail": _CHILD_TESTS[argv[1]](Path(argv[2] if len(argv) > 2 else "."))}
    except OSError as e:
        report = {"ok": False, "detail": e.strerror or str(e)}
    except _ProbeFailed as e:
        report = {"ok": False, "detail": str(e)}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
