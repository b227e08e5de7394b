"""What the RUN sandbox can do on this machine, found by trying, and the isolation/backend a build will use.

Contract: :func:`run_probes` tries each capability in a short-lived child (``python -m
imgci.build.sandbox.probe_child --child TEST DIR``; the imgci process is threaded and never forks), each under a
timeout, in a fresh directory under ``scratch`` that is removed afterwards; results are cached per process and
scratch directory (and between builds by ``probecache``). A failed probe has a ``detail`` (what happened) and a
``fix`` (what to change). :func:`choose` turns probes into a :class:`Choice` or raises :class:`SandboxError` whose
hint is the fix.

Probes: ``kernel`` (overlay with ``userxattr`` needs ≥ 5.11), ``userns`` (user+mount+pid+ipc+uts namespaces and a
self map), ``idmap`` (the :func:`plan_idmap` plan, written into a real child), ``mount`` (tmpfs in a user namespace),
``overlay`` (overlayfs with ``userxattr`` in a user namespace, a whiteout included), ``proc`` (a fresh procfs in a
new pid namespace), ``chroot`` (root with CAP_SYS_CHROOT) and, for root, ``chroot-mount``, ``chroot-overlay`` and
``chroot-proc``: the same in a private mount namespace of the initial user namespace.

Test hooks (environment): ``IMGCI_SANDBOX_PROBE_DENY=userns,overlay,…`` makes the named probes fail with detail
"denied by IMGCI_SANDBOX_PROBE_DENY" without running them; a name also denies every probe with that name as a
dash-separated part (``overlay`` denies ``chroot-overlay``, ``chroot`` every ``chroot-*``). ``IMGCI_SUBUID_FILE``
and ``IMGCI_SUBGID_FILE`` replace /etc/subuid and /etc/subgid when planning the id map.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from imgci import child_pythonpath
from imgci.build.sandbox.idmap import (
    FULL_RANGE,
    IdMap,
    helper_is_privileged,
    plan_idmap,
    single_idmap,
    verify_idmap,
)
from imgci.errors import SandboxError, UsageError

Isolation = Literal["userns", "chroot"]
Backend = Literal["overlay", "native"]

MODULE = "imgci.build.sandbox.probe_child"
TIMEOUT = 5.0
DENIED = "denied by IMGCI_SANDBOX_PROBE_DENY"
UNDENY = "unset IMGCI_SANDBOX_PROBE_DENY (a test hook)"
NATIVE_FIX = "builds use --backend native instead (copy + diff: the same layers, slower)"
CONTAINER_FIX = (
    "in a container: docker/podman run --security-opt seccomp=unconfined --security-opt apparmor=unconfined, "
    "or use --isolation chroot there as root"
)
PROC_FIX = (
    "a container masks /proc: docker run --security-opt systempaths=unconfined (podman: --security-opt unmask=ALL); "
    "RUN steps that read /proc may fail meanwhile"
)
CAP_SYS_ADMIN_FIX = "grant CAP_SYS_ADMIN (docker run --cap-add SYS_ADMIN): without it RUN gets no fresh /proc or tmpfs"
CAP_SYS_CHROOT, CAP_SYS_ADMIN = 18, 21


@dataclass(frozen=True)
class ProbeResult:
    """One capability: ``ok``, what was seen, and (when not ok) what to change. ``skipped``: does not apply here."""

    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False


@dataclass(frozen=True)
class Probes:
    """Every probe's result, plus the id map a user-namespace sandbox will use (verified when ``idmap`` is ok)."""

    euid: int
    kernel: ProbeResult
    userns: ProbeResult
    idmap: ProbeResult
    mount: ProbeResult
    overlay: ProbeResult
    proc: ProbeResult
    chroot: ProbeResult
    chroot_mount: ProbeResult
    chroot_overlay: ProbeResult
    chroot_proc: ProbeResult
    plan: IdMap = field(compare=False)

    def results(self) -> list[tuple[str, ProbeResult]]:
        """(name, result) in display order, named as in IMGCI_SANDBOX_PROBE_DENY (``chroot-mount``)."""
        names = [f.name for f in fields(self) if f.name not in ("euid", "plan")]
        return [(name.replace("_", "-"), getattr(self, name)) for name in names]

    @property
    def userns_works(self) -> bool:
        """A user-namespace sandbox needs the namespaces and mounts inside them (bind, pivot_root)."""
        return self.userns.ok and self.mount.ok


@dataclass(frozen=True)
class Choice:
    isolation: Isolation
    backend: Backend
    idmap: IdMap
    reasons: list[str]  # what was chosen and why, one sentence each
    warnings: list[str]  # degraded but working: single-uid map, no fresh /proc, no mounts


# -- the chooser --------------------------------------------------------------------------------------------------
def choose(
    isolation: str = "auto", backend: str = "auto", *, probes: Probes | None = None, scratch: Path | None = None
) -> Choice:
    """The strongest isolation and the fastest snapshot backend that work, or the forced ones if they work.

    ``scratch`` (used only without ``probes``) is where probes make directories: pass the directory that will hold
    snapshots, since overlay support depends on its filesystem.
    """
    if isolation not in ("auto", "userns", "chroot"):
        raise UsageError(f"invalid isolation {isolation!r}: expected auto, userns or chroot")
    if backend not in ("auto", "overlay", "native"):
        raise UsageError(f"invalid backend {backend!r}: expected auto, overlay or native")
    p = probes if probes is not None else run_probes(scratch)
    reasons: list[str] = []
    warnings: list[str] = []
    iso = _choose_isolation(isolation, p, reasons, warnings)
    proc = p.proc if iso == "userns" else p.chroot_proc
    if not proc.ok:
        warnings.append(f"a fresh /proc cannot be mounted in the sandbox ({proc.detail}); fix: {proc.fix}")
    overlay = p.overlay if iso == "userns" else p.chroot_overlay
    chosen: Backend = "native"
    if backend == "native":
        reasons.append("native: requested with --backend native")
    elif overlay.ok:
        chosen = "overlay"
        how = "with userxattr in a user namespace" if iso == "userns" else "as root in a private mount namespace"
        reasons.append(f"overlay: kernel overlayfs works {how}, with whiteouts and opaque dirs")
    elif backend == "overlay":
        raise SandboxError(f"--backend overlay does not work with isolation {iso}: {overlay.detail}", hint=overlay.fix)
    else:
        reasons.append(f"native: overlay does not work here ({overlay.detail})")
    return Choice(iso, chosen, p.plan, reasons, warnings)  # chroot needs root, whose plan is the identity


def _choose_isolation(isolation: str, p: Probes, reasons: list[str], warnings: list[str]) -> Isolation:
    broken = p.userns if not p.userns.ok else p.mount  # why userns does not work, when it does not
    if isolation in ("auto", "userns") and p.userns_works:
        reasons.append(f"userns: user namespaces work; {p.plan.describe()}")
        if p.plan.warning:
            warnings.append(p.plan.warning)
        return "userns"
    if isolation == "userns":
        raise SandboxError(f"--isolation userns does not work here: {broken.detail}", hint=broken.fix or None)
    if isolation == "chroot" and p.euid != 0:
        raise SandboxError(
            "chroot isolation needs root (it is for root inside an unprivileged container); use --isolation userns"
        )
    if not p.chroot.ok:
        if isolation == "chroot":
            raise SandboxError(f"--isolation chroot does not work here: {p.chroot.detail}", hint=p.chroot.fix or None)
        raise SandboxError(
            f"no sandbox isolation works here: userns: {broken.detail}; chroot: {p.chroot.detail}",
            hint=broken.fix or None,
        )
    why = "requested" if isolation == "chroot" else f"user namespaces do not work here ({broken.detail})"
    reasons.append(f"chroot: {why}; running as root with CAP_SYS_CHROOT")
    if not p.chroot_mount.ok:
        warnings.append(f"no mounts in the chroot sandbox ({p.chroot_mount.detail}); fix: {p.chroot_mount.fix}")
    return "chroot"


# -- facts about this process and host ----------------------------------------------------------------------------
def read_proc(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _status(name: str, read: Callable[[str], str | None] = read_proc) -> str:
    for line in (read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def userns_fix(euid: int, read: Callable[[str], str | None] = read_proc) -> str:
    """The known blockers of user namespaces that apply here (read from /proc), each with its fix."""
    fixes = []
    if euid != 0 and read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        fixes.append(
            "kernel.unprivileged_userns_clone=0 (Debian/Ubuntu): as root, sysctl -w kernel.unprivileged_userns_clone=1"
        )
    if read("/proc/sys/user/max_user_namespaces") == "0":
        fixes.append("user.max_user_namespaces=0: as root, sysctl -w user.max_user_namespaces=15000")
    if euid != 0 and read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        fixes.append(
            "AppArmor restricts unprivileged user namespaces (Ubuntu ≥ 23.10): as root, sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0, or give this python an AppArmor profile with 'userns,'"
        )
    if _status("Seccomp", read) == "2":
        fixes.append(f"a seccomp filter is active, as in a container whose profile refuses unshare: {CONTAINER_FIX}")
    if not fixes:
        fixes.append(f"user namespaces are refused (a kernel without CONFIG_USER_NS, or a sandbox): {CONTAINER_FIX}")
    return "; ".join(fixes)


def kernel_probe(release: str | None = None) -> ProbeResult:
    release = release or os.uname().release
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return ProbeResult(True, f"{release} (version not understood; overlay is probed anyway)")
    if version >= (5, 11):
        return ProbeResult(True, f"Linux {release} (overlay with userxattr needs ≥ 5.11)")
    return ProbeResult(False, f"Linux {release}: overlay in a user namespace needs ≥ 5.11", NATIVE_FIX)


def chroot_probe(euid: int, capeff: int) -> ProbeResult:
    if euid != 0:
        return ProbeResult(False, "not root (chroot isolation is for root inside a container)", skipped=True)
    if not capeff >> CAP_SYS_CHROOT & 1:
        return ProbeResult(False, "root without CAP_SYS_CHROOT", "docker run --cap-add SYS_CHROOT (it is a default)")
    mounts = "yes (mounts possible)" if capeff >> CAP_SYS_ADMIN & 1 else "no (no mounts: no fresh /proc, /dev, tmpfs)"
    return ProbeResult(True, f"root with CAP_SYS_CHROOT; CAP_SYS_ADMIN: {mounts}")


# -- running the probes -------------------------------------------------------------------------------------------
@functools.cache
def run_probes(scratch: Path | None = None) -> Probes:
    """Probe everything, in parallel child processes; directories go under ``scratch`` (default: the temp dir)."""
    euid, egid = os.geteuid(), os.getegid()
    try:
        user = pwd.getpwuid(euid).pw_name
    except KeyError:  # an arbitrary uid without a passwd entry (OpenShift and friends)
        user = str(euid)
    plan = plan_idmap(
        euid,
        egid,
        user,
        subuid_path=Path(os.environ.get("IMGCI_SUBUID_FILE") or "/etc/subuid"),
        subgid_path=Path(os.environ.get("IMGCI_SUBGID_FILE") or "/etc/subgid"),
        newuidmap=shutil.which("newuidmap"),
        newgidmap=shutil.which("newgidmap"),
    )
    base = scratch if scratch is not None else Path(tempfile.gettempdir())
    kernel = kernel_probe()
    ns_fix = f"mounts in a user namespace are refused: {userns_fix(euid)}"
    overlay_fix = (
        f"the filesystem of {base} may not take overlay upper dirs (overlay on overlay; tmpfs before Linux 6.6): "
        f"put the state directory on ext4, xfs or btrfs; otherwise {NATIVE_FIX}"
    )
    chroot_overlay_fix = (
        overlay_fix
        if read_proc("/proc/self/uid_map") == f"0 0 {FULL_RANGE}"
        else f"root here is root of a user namespace (a rootless container?), where overlay may not set its trusted.* "
        f"xattrs; {NATIVE_FIX}"
    )
    jobs: dict[str, Callable[[], ProbeResult]] = {
        "userns": lambda: _child_probe("userns", base, userns_fix(euid)),
        "idmap": lambda: _idmap_probe(plan),
        "mount": lambda: _child_probe("mount", base, ns_fix),
        "overlay": lambda: _child_probe("overlay", base, overlay_fix if kernel.ok else kernel.fix),
        "proc": lambda: _child_probe("proc", base, PROC_FIX),
    }
    if euid == 0:
        jobs["chroot-mount"] = lambda: _child_probe("chroot-mount", base, CAP_SYS_ADMIN_FIX)
        jobs["chroot-overlay"] = lambda: _child_probe("chroot-overlay", base, chroot_overlay_fix)
        jobs["chroot-proc"] = lambda: _child_probe("chroot-proc", base, PROC_FIX)
    deny = {n.strip() for n in os.environ.get("IMGCI_SANDBOX_PROBE_DENY", "").split(",") if n.strip()}
    denied = {name for name in [*jobs, "kernel", "chroot"] if name in deny or deny & set(name.split("-"))}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items() if name not in denied}
        got = {name: future.result() for name, future in futures.items()}
    got.update({name: ProbeResult(False, DENIED, UNDENY) for name in denied})
    if plan.kind == "subid" and not got["idmap"].ok and got["userns"].ok:  # the helpers refused: degrade, not fail
        plan = single_idmap(
            euid, egid, f"single-uid mapping ({got['idmap'].detail}): only root exists inside. Fix: {got['idmap'].fix}"
        )
    not_root = ProbeResult(False, "not root (only for chroot isolation)", skipped=True)
    return Probes(
        euid=euid,
        kernel=got.get("kernel", kernel),
        userns=got["userns"],
        idmap=got["idmap"],
        mount=got["mount"],
        overlay=got["overlay"],
        proc=got["proc"],
        chroot=got.get("chroot") or chroot_probe(euid, int(_status("CapEff") or "0", 16)),
        chroot_mount=got.get("chroot-mount", not_root),
        chroot_overlay=got.get("chroot-overlay", not_root),
        chroot_proc=got.get("chroot-proc", not_root),
        plan=plan,
    )


def _child_argv(test: str, workdir: str = "") -> list[str]:
    return [sys.executable, "-m", MODULE, "--child", test, workdir]


def _child_env() -> dict[str, str]:
    """The environment plus a PYTHONPATH that finds this imgci, however the parent found it."""
    return {**os.environ, "PYTHONPATH": child_pythonpath()}


def _child_probe(test: str, base: Path, fix: str) -> ProbeResult:
    """Run one child test in a fresh directory under ``base``; its last JSON line is the result.

    ``fix`` is for the capability itself; when the child could not even unshare its namespaces, the fix is the one
    for that (user namespaces, or CAP_SYS_ADMIN for the ``chroot-*`` tests)."""
    workdir = tempfile.mkdtemp(prefix=f"imgci-probe-{test}-", dir=base)
    try:
        proc = subprocess.run(
            _child_argv(test, workdir), capture_output=True, text=True, timeout=TIMEOUT, env=_child_env(), check=False
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if lines:
            report = json.loads(lines[-1])
            ok, detail = bool(report["ok"]), str(report["detail"])
        else:
            ok, detail = False, f"probe child failed: {(proc.stderr.strip() or 'no output').splitlines()[-1]}"
    except subprocess.TimeoutExpired:
        ok, detail = False, f"timed out after {TIMEOUT:g}s"
    finally:
        # overlay makes its work dir mode 000: open directories up so the owner can remove them
        for root, dirs, _ in os.walk(workdir):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
    if not ok and detail.startswith("unshare:") and test != "userns":
        fix = CAP_SYS_ADMIN_FIX if test.startswith("chroot-") else "user namespaces must work first (the userns probe)"
    return ProbeResult(ok, detail, "" if ok else fix)


def _idmap_probe(plan: IdMap) -> ProbeResult:
    """Write ``plan`` into a real child that unshared its user namespace, as the sandbox launcher will."""
    fix = plan.warning.split("Fix: ", 1)[-1] if plan.warning else ""
    try:
        verify_idmap(plan, _child_argv("idmap"), _child_env(), TIMEOUT)
    except SandboxError as e:
        if e.message.startswith("unshare:"):
            return ProbeResult(
                False, f"{plan.describe()}; not verified ({e.message})", "user namespaces must work first"
            )
        if plan.kind == "subid" and not all(helper_is_privileged(shutil.which(t) or t) for t in _HELPERS):
            fix = "newuidmap/newgidmap must be setuid root or have file capabilities: apt-get reinstall uidmap"
        return ProbeResult(False, f"{plan.describe()}: {e.message}", fix or "check /etc/subuid and /etc/subgid")
    return ProbeResult(plan.warning is None, f"{plan.describe()} (verified)", fix)


_HELPERS = ("newuidmap", "newgidmap")
