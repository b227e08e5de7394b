"""Parent-side uid/gid mapping for a sandbox child that has unshared its user namespace.

Contract: :func:`plan_idmap` decides, without side effects, how ids inside the namespace map to ids outside it:
``root`` (identity over every id imgci's own namespace has: the whole id space on a host), ``subid`` (inside 0 is
the caller, inside 1…count are the caller's first /etc/subuid and /etc/subgid range, written by the setuid helpers
``newuidmap``/``newgidmap``) or ``single`` (inside 0 is the caller and nothing else exists). ``warning`` says what
a degraded plan breaks and how to fix it. :func:`apply_idmap` writes a plan into a child process and raises
:class:`SandboxError` with the helper's own message when the kernel or the helper refuses; :func:`verify_idmap`
does that to a throwaway child that reports what it reads back (the probe's ``idmap`` test).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgci.errors import SandboxError

IdKind = Literal["root", "subid", "single"]
IdLine = tuple[int, int, int]  # (inside, outside, count), as in /proc/PID/uid_map

FULL_RANGE = 4294967295  # every id but (uid_t)-1, as the init namespace maps it
SUBID_FIX = "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
HELPER_FIX = "apt-get install uidmap (Debian/Ubuntu; dnf install shadow-utils on Fedora/RHEL)"


@dataclass(frozen=True)
class SubIdRange:
    start: int
    count: int

    def __str__(self) -> str:
        return f"{self.start}+{self.count}"


@dataclass(frozen=True)
class IdMap:
    """The maps to write: ``uid_lines``/``gid_lines`` are (inside, outside, count) triples."""

    uid_lines: list[IdLine]
    gid_lines: list[IdLine]
    kind: IdKind
    warning: str | None = None

    def describe(self) -> str:
        """One human phrase, e.g. ``subuid range 600000+65536 via newuidmap``."""
        if self.kind == "root":
            if self.uid_lines == [(0, 0, FULL_RANGE)]:
                return "running as root: the full id range maps to itself"
            ids = sum(n for _, _, n in self.uid_lines)
            return f"running as root of a user namespace: its {ids} uids map to themselves"
        if self.kind == "subid":
            (_, ustart, ucount), (_, gstart, gcount) = self.uid_lines[1], self.gid_lines[1]
            return f"subuid range {ustart}+{ucount}, subgid range {gstart}+{gcount} via newuidmap/newgidmap"
        return f"single-uid mapping: root inside is uid {self.uid_lines[0][1]} outside, no other ids"


def _identity(own_map: Path) -> list[IdLine]:
    """Identity lines over the ids this process's namespace has (its own uid_map/gid_map)."""
    try:
        text = own_map.read_text()
    except OSError:
        text = ""
    lines: list[IdLine] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            lines.append((int(fields[0]), int(fields[0]), int(fields[2])))
    return sorted(lines) or [(0, 0, FULL_RANGE)]


def read_subids(path: Path, user: str, uid: int) -> list[SubIdRange]:
    """The ranges ``path`` (/etc/subuid or /etc/subgid format, ``name_or_uid:start:count``) grants ``user``/``uid``.

    Lines are matched by user name or by numeric uid, as shadow-utils does; comments, blank and malformed lines
    are skipped. A missing or unreadable file means no ranges.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    ranges = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            continue
        owner, start, count = fields[0], int(fields[1]), int(fields[2])
        if count > 0 and (owner == user or owner == str(uid)):
            ranges.append(SubIdRange(start, count))
    return ranges


def helper_is_privileged(path: str) -> bool:
    """Whether a newuidmap/newgidmap binary can do its job: setuid root, or carrying file capabilities."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_mode & stat.S_ISUID and st.st_uid == 0:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def plan_idmap(
    euid: int,
    egid: int,
    user_name: str,
    subuid_path: Path = Path("/etc/subuid"),
    subgid_path: Path = Path("/etc/subgid"),
    newuidmap: str | None = shutil.which("newuidmap"),
    newgidmap: str | None = shutil.which("newgidmap"),
    *,
    own_uid_map: Path = Path("/proc/self/uid_map"),
    own_gid_map: Path = Path("/proc/self/gid_map"),
) -> IdMap:
    """The mapping a user namespace created by (``euid``, ``egid``) gets; see the module docstring.

    Root maps every id its own namespace has onto itself: the full range on a host, only the container's ids when
    this root is itself the root of a user namespace (a rootless container: ``own_uid_map``/``own_gid_map``).
    """
    if euid == 0:
        uid_lines, gid_lines = _identity(own_uid_map), _identity(own_gid_map)
        count = min(sum(n for _, _, n in uid_lines), sum(n for _, _, n in gid_lines))
        warning = None
        if count < 65536:
            warning = (
                f"root here owns only {count} ids (a rootless container?): RUN steps that use uids or gids beyond "
                "them fail. Fix: give the container a larger id range (e.g. podman --userns=auto:size=65536)"
            )
        return IdMap(uid_lines, gid_lines, "root", warning)
    uids = read_subids(subuid_path, user_name, euid)
    gids = read_subids(subgid_path, user_name, euid)
    problems, fixes = [], []
    if not uids or not gids:
        missing = " and ".join(str(p) for p, r in ((subuid_path, uids), (subgid_path, gids)) if not r)
        problems.append(f"no range for {user_name} in {missing}")
        fixes.append(f"as root: {SUBID_FIX.format(user=user_name)}")
    helpers = [name for name, path in (("newuidmap", newuidmap), ("newgidmap", newgidmap)) if not path]
    if helpers:
        problems.append(f"{' and '.join(helpers)} not found")
        fixes.append(f"as root: {HELPER_FIX}")
    if not problems:
        return IdMap(
            [(0, euid, 1), (1, uids[0].start, uids[0].count)],
            [(0, egid, 1), (1, gids[0].start, gids[0].count)],
            "subid",
        )
    warning = (
        f"single-uid mapping ({'; '.join(problems)}): inside the sandbox only root exists, so RUN steps that chown "
        f"or switch users (useradd, apt-get's _apt, USER nobody) fail. Fix: {'; '.join(fixes)}"
    )
    return single_idmap(euid, egid, warning)


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise SandboxError(f"cannot write {path}: {e.strerror}") from e


def _lines(lines: list[IdLine]) -> str:
    return "".join(f"{inside} {outside} {count}\n" for inside, outside, count in lines)


def _run_helper(tool: str, pid: int, lines: list[IdLine]) -> None:
    argv = [tool, str(pid), *(str(n) for line in lines for n in line)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"{tool} could not run: {e}", hint=HELPER_FIX) from e
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise SandboxError(
            f"{os.path.basename(tool)} refused to map ids for the sandbox: {message}",
            hint="check that /etc/subuid and /etc/subgid list the range for this user and that the helper is "
            "setuid root (ls -l $(command -v newuidmap))",
        )


def apply_idmap(pid: int, idmap: IdMap) -> None:
    """Write ``idmap`` into process ``pid``, which has unshared CLONE_NEWUSER and waits for its maps."""
    if idmap.kind == "subid":
        _run_helper(shutil.which("newuidmap") or "newuidmap", pid, idmap.uid_lines)
        _run_helper(shutil.which("newgidmap") or "newgidmap", pid, idmap.gid_lines)
        return
    if idmap.kind == "single":
        # An unprivileged writer may map its own gid only after giving up setgroups(2) (user_namespaces(7)).
        _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", _lines(idmap.uid_lines))
    _write(f"/proc/{pid}/gid_map", _lines(idmap.gid_lines))


def single_idmap(euid: int, egid: int, warning: str) -> IdMap:
    """The fallback: root inside is the caller, nothing else is mapped."""
    return IdMap([(0, euid, 1)], [(0, egid, 1)], "single", warning)


def child_await_idmap() -> str:
    """The child side of :func:`verify_idmap`: unshare CLONE_NEWUSER, say ``ready``, wait for a line (the parent
    writes the maps meanwhile) and return the maps as JSON ``[uid_map lines, gid_map lines]``."""
    import sys

    from imgci.build.sandbox import libc

    libc.unshare(libc.CLONE_NEWUSER)
    print("ready", flush=True)
    sys.stdin.readline()
    maps = []
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/self/{name}") as f:
            maps.append([[int(n) for n in line.split()] for line in f.read().splitlines()])
    return json.dumps(maps)


def verify_idmap(idmap: IdMap, argv: list[str], env: dict[str, str], timeout: float) -> None:
    """Start ``argv`` (a child that runs :func:`child_await_idmap` and prints ``{"ok": true, "detail": <its
    result>}`` as one JSON line), write ``idmap`` into it and compare what the child reads back.

    Raises :class:`SandboxError` saying what failed (the child, the helper, or maps that read back differently).
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        first = proc.stdout.readline() if ready else ""
        if first.strip() == "ready":
            apply_idmap(proc.pid, idmap)
            out, err = proc.communicate("go\n", timeout=timeout)
        elif ready:
            out, err = proc.communicate(timeout=timeout)
            out = first + out
        else:
            raise SandboxError(f"the id map test child did not start within {timeout:g}s")
    except subprocess.TimeoutExpired:
        raise SandboxError(f"the id map test child did not finish within {timeout:g}s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else None
    if report is None:
        raise SandboxError(f"the id map test child failed: {(err.strip() or 'no output').splitlines()[-1]}")
    if not report.get("ok"):
        raise SandboxError(str(report.get("detail")))
    seen = json.loads(report["detail"])
    if seen != [[list(x) for x in idmap.uid_lines], [list(x) for x in idmap.gid_lines]]:
        raise SandboxError(f"the maps read back differ from the plan: uid_map {seen[0]}, gid_map {seen[1]}")
