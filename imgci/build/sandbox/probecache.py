"""The sandbox probes of :mod:`imgci.build.sandbox.probe`, remembered in the state directory between builds.

Contract: :func:`probes_for_build` returns the probes a build chooses its sandbox with. Probing starts several
short-lived processes (0.3 s or more); the result depends only on facts that rarely change, so it is kept in
``STATE/cache/sandbox-probes.json`` and in the user's cache directory (``$XDG_CACHE_HOME/imgci``, default
``~/.cache/imgci``: a CI job's fresh state directory need not probe again) under a fingerprint of them (imgci's
version, kernel, effective ids, this process's id maps, capabilities and seccomp mode, /etc/subuid and
/etc/subgid, the newuidmap/newgidmap helpers, the probe hooks in the environment, and the file system the probes
ran on: its device, type and options) for a day. :func:`forget` drops both — the launcher calls it when a
sandbox cannot be set up, so the next build probes afresh. ``imgci doctor`` always probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgci.build.sandbox.idmap import IdMap
from imgci.build.sandbox.probe import ProbeResult, Probes, run_probes

MAX_AGE = 24 * 3600
_FILE = "sandbox-probes.json"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def fingerprint(scratch: Path) -> str:
    from imgci import __version__

    status = {
        line.split(":")[0]: line.split(":", 1)[1].strip()
        for line in _read("/proc/self/status").splitlines()
        if line.startswith(("CapEff", "CapBnd", "Seccomp", "NoNewPrivs"))
    }
    helpers = []
    for tool in ("newuidmap", "newgidmap"):
        path = shutil.which(tool)
        st = os.stat(path) if path else None
        helpers.append((path, st.st_mode if st else 0, st.st_mtime_ns if st else 0))
    facts = {
        "version": __version__,
        "kernel": os.uname().release,
        "ids": (os.geteuid(), os.getegid()),
        "maps": (_read("/proc/self/uid_map"), _read("/proc/self/gid_map")),
        "status": status,
        "subids": (
            _read(os.environ.get("IMGCI_SUBUID_FILE") or "/etc/subuid"),
            _read(os.environ.get("IMGCI_SUBGID_FILE") or "/etc/subgid"),
        ),
        "helpers": helpers,
        "env": [os.environ.get(k, "") for k in ("IMGCI_SANDBOX_PROBE_DENY", "IMGCI_SUBUID_FILE", "IMGCI_SUBGID_FILE")],
        "sysctl": [
            _read(f"/proc/sys/{p}")
            for p in (
                "user/max_user_namespaces",
                "kernel/unprivileged_userns_clone",
                "kernel/apparmor_restrict_unprivileged_userns",
            )
        ],
        "filesystem": _filesystem(Path(scratch)),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _filesystem(path: Path) -> str:
    """The file system ``path`` is on — device, type and super-block options (what overlay support depends on)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return str(path)
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == majmin and " - " in line:
            return f"{majmin} {line.split(' - ', 1)[1]}"
    return majmin


def _locations(state_dir: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgci"
    return [Path(state_dir) / "cache" / _FILE, user / _FILE]


def _dump(probes: Probes) -> dict[str, Any]:
    return dataclasses.asdict(probes)


def _load(doc: dict[str, Any]) -> Probes:
    plan = doc.pop("plan")
    idmap = IdMap(
        [(int(x[0]), int(x[1]), int(x[2])) for x in plan["uid_lines"]],
        [(int(x[0]), int(x[1]), int(x[2])) for x in plan["gid_lines"]],
        plan["kind"],
        plan.get("warning"),
    )
    results = {k: ProbeResult(**v) for k, v in doc.items() if isinstance(v, dict)}
    return Probes(euid=int(doc["euid"]), plan=idmap, **results)


def probes_for_build(state_dir: Path, scratch: Path, probe: Callable[[Path], Probes] = run_probes) -> Probes:
    """The probes, from a cache when its fingerprint matches and it is fresh, else ``probe(scratch)`` (cached)."""
    key = fingerprint(scratch)
    locations = _locations(state_dir)
    for path in locations:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(path.read_text())
            if doc.get("key") == key and time.time() - float(doc.get("time", 0)) < MAX_AGE:
                return _load(doc["probes"])
    probes = probe(scratch)
    text = json.dumps({"key": key, "time": time.time(), "probes": _dump(probes)})
    for path in locations:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{_FILE}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
    return probes


def forget(state_dir: Path) -> None:
    for path in _locations(state_dir):
        with contextlib.suppress(OSError):
            path.unlink()
