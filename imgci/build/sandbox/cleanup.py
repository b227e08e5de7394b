"""Removing what RUN steps left in the state directory: snapshots, work directories, cache mounts.

Contract:
- :func:`remove_owned` deletes paths whose files may belong to the invoking user's subordinate ids (a rootless
  RUN's files): as root directly, otherwise from a sandbox child that is root in a user namespace with the same id
  map, so nothing needs real root. It never fails the caller: what cannot be removed is reported.
- :func:`sweep` is ``imgci prune``'s part for the sandbox: snapshots whose diff_id is not in ``keep`` and that no
  running build holds (the layer store's lock of the same diff_id), snapshot and work directories of dead
  processes, and cache mounts nobody holds. Returns (paths removed, bytes freed). A snapshot is renamed to a
  ``.tmp-<pid>-*`` name before it is deleted, so a killed prune never leaves part of one under its name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from imgci.oci import Digest


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda e: None):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def remove_owned(paths: list[Path]) -> list[str]:
    """Delete ``paths`` (see the module contract); returns error messages for what is left."""
    todo = [p for p in paths if os.path.lexists(p)]
    if not todo:
        return []
    if os.geteuid() != 0:
        _remove_in_namespace(todo)
    problems = []
    for p in todo:
        shutil.rmtree(p, ignore_errors=True)
        if os.path.lexists(p):
            problems.append(f"could not remove {p}")
    return problems


def _remove_in_namespace(paths: list[Path]) -> None:
    from imgci.build.sandbox.idmap import apply_idmap, plan_idmap
    from imgci.build.sandbox.spec import ChildSpec

    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = str(os.geteuid())
    idmap = plan_idmap(os.geteuid(), os.getegid(), name)
    spec = ChildSpec(action="remove", isolation="userns", id_kind=idmap.kind, remove=[str(p) for p in paths])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgci._sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(spec.dumps().encode() + b"\n")
            proc.stdin.flush()
            for raw in proc.stdout:
                if b'"maps"' in raw:
                    import json

                    apply_idmap(int(json.loads(raw)["pid"]), idmap)
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
        except Exception:
            proc.kill()
        finally:
            with contextlib.suppress(Exception):
                proc.wait(timeout=120)


def _dead(name: str, prefix: str) -> bool:
    """Whether ``name`` (``<prefix><pid>-<random>``) belongs to a process that no longer runs."""
    from imgci.build.layerstore import pid_alive

    pid = name[len(prefix) :].split("-")[0]
    return pid.isdigit() and not pid_alive(pid)


def sweep(state_dir: Path, layer_store: Any, keep: set[Digest]) -> tuple[int, int]:
    """Remove the sandbox's leftovers under ``state_dir``; see the module contract."""
    victims: list[Path] = []
    locks: list[int] = []
    try:
        for flavor in (state_dir / "snapshots").glob("*"):
            for p in flavor.iterdir() if flavor.is_dir() else []:
                if p.name.startswith(".tmp-"):
                    if _dead(p.name, ".tmp-"):
                        victims.append(p)
                    continue
                try:
                    diff_id = Digest("sha256:" + p.name)
                except Exception:
                    continue
                if diff_id in keep:
                    continue
                fd = layer_store.lock_exclusive_nowait(diff_id)
                if fd is None:
                    continue  # a running build uses it
                locks.append(fd)
                # Gone under its name at once, deleted at leisure: a snapshot is found by its name alone, so a
                # prune killed halfway through deleting it in place left half a lower dir for every later RUN.
                # Killed now, it leaves a .tmp- dir of a dead process, which the next sweep removes.
                trash = flavor / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
                try:
                    os.rename(p, trash)
                except OSError:
                    continue
                victims.append(trash)
        tmp = state_dir / "tmp"
        for p in tmp.glob("run-*") if tmp.is_dir() else []:
            if _dead(p.name, "run-"):
                victims.append(p)
        mounts = state_dir / "cache" / "mounts"
        for p in mounts.iterdir() if mounts.is_dir() else []:
            if not p.is_dir():
                continue
            fd = os.open(mounts / f"{p.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            locks.append(fd)
            victims.append(p)
        freed = sum(_size(p) for p in victims)
        remove_owned(victims)
        removed = sum(1 for p in victims if not os.path.lexists(p))
        return removed, freed
    finally:
        for fd in locks:
            os.close(fd)
