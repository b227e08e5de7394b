"""The libc calls Python's ``os`` module lacks (on 3.11), through cffi in ABI mode — the only cffi user.

Contract: each function raises :class:`OSError` (with errno and the call's name) on failure, like ``os`` does.
Nothing here is compiled: ``cffi`` opens the process's own libc (``dlopen(None)``), so installing imgci needs no
compiler. Constants are Linux's (identical on x86_64 and aarch64).

The declarations (:data:`_CDEF`) are used *out of line*: :mod:`imgci.build.sandbox._libc_ffi` is the module cffi
generates from them (``python -m imgci.build.sandbox.libc``; a test holds it to :data:`_CDEF`), plain Python that
loads in ~2 ms. Parsing them at run time (``FFI().cdef``, with pycparser) took ~29 ms, paid by every sandbox child
— a RUN step's fixed cost.
"""

from __future__ import annotations

import os
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}

_CDEF = """
int unshare(int flags);
int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int sethostname(const char *name, size_t len);
long syscall(long number, ...);
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);
int capget(void *header, void *data);
int capset(void *header, const void *data);
"""

_lib: Any = None
_ffi: Any = None


def _libc() -> tuple[Any, Any]:
    global _lib, _ffi
    if _lib is None:
        from imgci.build.sandbox._libc_ffi import ffi

        _lib, _ffi = ffi.dlopen(None), ffi
    return _lib, _ffi


def preload() -> None:
    """Open libc now (the fork server does, so that the children it forks have it)."""
    _libc()


def generate(directory: str) -> str:
    """Write the out-of-line module for :data:`_CDEF` under ``directory`` (as ``imgci/build/sandbox/_libc_ffi.py``);
    returns its path."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(_CDEF)
    builder.set_source(f"{__package__}._libc_ffi", None)
    return str(builder.compile(tmpdir=directory))


def _check(result: int, call: str, *paths: str) -> None:
    if result != 0:
        _, ffi = _libc()
        err = ffi.errno
        raise OSError(err, f"{call}: {os.strerror(err)}", *paths[:1])


def unshare(flags: int) -> None:
    lib, _ = _libc()
    _check(lib.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    lib, ffi = _libc()
    enc = os.fsencode
    _check(
        lib.mount(
            enc(source) if source is not None else ffi.NULL,
            enc(target),
            enc(fstype) if fstype is not None else ffi.NULL,
            flags,
            enc(data) if data is not None else ffi.NULL,
        ),
        f"mount {fstype or 'bind'} on {target}",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    lib, _ = _libc()
    _check(lib.umount2(os.fsencode(target), flags), f"umount {target}", target)


def pivot_root(new_root: str, put_old: str) -> None:
    lib, ffi = _libc()
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {os.uname().machine}")
    result = lib.syscall(number, ffi.new("char[]", os.fsencode(new_root)), ffi.new("char[]", os.fsencode(put_old)))
    _check(int(result), "pivot_root", new_root)


def sethostname(name: str) -> None:
    lib, _ = _libc()
    raw = name.encode()
    _check(lib.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int) -> None:
    lib, _ = _libc()
    _check(lib.prctl(option, arg, 0, 0, 0), "prctl")


def clear_inheritable_capabilities() -> None:
    """Empty this thread's inheritable and ambient capability sets (effective and permitted unchanged)."""
    lib, ffi = _libc()
    header = ffi.new("uint32_t[2]", [_LINUX_CAPABILITY_VERSION_3, 0])  # version, pid (0: this thread)
    data = ffi.new("uint32_t[6]")  # two {effective, permitted, inheritable}: capabilities 0-31 and 32-63
    _check(lib.capget(header, data), "capget")
    data[2] = data[5] = 0
    _check(lib.capset(header, data), "capset")
    lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: no ambient set to clear


if __name__ == "__main__":  # regenerate imgci/build/sandbox/_libc_ffi.py after changing _CDEF
    print(generate(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))))
