"""The sandbox capability probe without namespaces: subid parsing, id map plans, the chooser's rules, doctor output."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from imgci.build.sandbox import probe
from imgci.build.sandbox.idmap import (
    FULL_RANGE,
    IdMap,
    SubIdRange,
    apply_idmap,
    helper_is_privileged,
    plan_idmap,
    read_subids,
    single_idmap,
)
from imgci.build.sandbox.probe import ProbeResult, Probes, choose, chroot_probe, kernel_probe, userns_fix
from imgci.cli_doctor import doctor_report, render_text
from imgci.errors import BuildError, SandboxError, UsageError

OK = ProbeResult(True, "works")
ROOT_PLAN = IdMap([(0, 0, FULL_RANGE)], [(0, 0, FULL_RANGE)], "root")
SUBID_PLAN = IdMap([(0, 1000, 1), (1, 600000, 65536)], [(0, 1000, 1), (1, 600000, 65536)], "subid")


def make_probes(euid: int = 1000, **changes: object) -> Probes:
    """Every probe passing (chroot ones skipped when not root), then ``changes`` applied."""
    not_root = ProbeResult(False, "not root", skipped=True)
    base = Probes(
        euid=euid,
        kernel=OK,
        userns=OK,
        idmap=OK,
        mount=OK,
        overlay=OK,
        proc=OK,
        chroot=OK if euid == 0 else not_root,
        chroot_mount=OK if euid == 0 else not_root,
        chroot_overlay=OK if euid == 0 else not_root,
        chroot_proc=OK if euid == 0 else not_root,
        plan=ROOT_PLAN if euid == 0 else SUBID_PLAN,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def fail(detail: str, fix: str = "do the fix") -> ProbeResult:
    return ProbeResult(False, detail, fix)


# -- /etc/subuid parsing and id map plans ---------------------------------------------------------------------------
def test_read_subids_matches_name_or_uid_and_skips_junk(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text(
        "# comment\n\n"
        "alice:100000:65536\n"
        "bob:200000:65536\n"
        "1000:300000:1000\n"
        "alice:oops:10\n"  # malformed start
        "alice:1:2:3\n"  # too many fields
        "alice\n"  # too few
        "alice:400000:0\n"  # empty range
        "  alice:500000:10  \n"
    )
    assert read_subids(f, "alice", 1000) == [
        SubIdRange(100000, 65536),
        SubIdRange(300000, 1000),
        SubIdRange(500000, 10),
    ]
    assert read_subids(f, "bob", 1001) == [SubIdRange(200000, 65536)]
    assert read_subids(f, "carol", 1002) == []
    assert read_subids(tmp_path / "missing", "alice", 1000) == []
    assert str(SubIdRange(600000, 65536)) == "600000+65536"


def _subid_files(tmp_path: Path, uid_text: str, gid_text: str) -> tuple[Path, Path]:
    (tmp_path / "subuid").write_text(uid_text)
    (tmp_path / "subgid").write_text(gid_text)
    return tmp_path / "subuid", tmp_path / "subgid"


def test_plan_as_root_maps_the_whole_id_space(tmp_path: Path) -> None:
    own = tmp_path / "uid_map"
    own.write_text(f"         0          0 {FULL_RANGE}\n")
    plan = plan_idmap(0, 0, "root", tmp_path / "none", tmp_path / "none", None, None, own_uid_map=own, own_gid_map=own)
    assert plan == IdMap([(0, 0, FULL_RANGE)], [(0, 0, FULL_RANGE)], "root")
    assert plan.warning is None and "full id range" in plan.describe()


def test_plan_as_root_of_a_user_namespace_maps_only_its_ids(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_text("0 1000 1\n1 100000 65536\n")
    small.write_text("0 1000 1\n")
    plan = plan_idmap(0, 0, "root", own_uid_map=big, own_gid_map=big)
    assert plan.kind == "root" and plan.uid_lines == [(0, 0, 1), (1, 1, 65536)] and plan.warning is None
    assert "65537 uids" in plan.describe()
    plan = plan_idmap(0, 0, "root", own_uid_map=small, own_gid_map=small)
    assert plan.uid_lines == plan.gid_lines == [(0, 0, 1)]
    assert plan.warning is not None and "only 1 ids" in plan.warning


def test_plan_subid_uses_the_first_range_and_the_callers_own_ids(tmp_path: Path) -> None:
    subuid, subgid = _subid_files(tmp_path, "ci:600000:65536\nci:900000:10\n", "1000:700000:5000\n")
    plan = plan_idmap(1000, 1001, "ci", subuid, subgid, "/usr/bin/newuidmap", "/usr/bin/newgidmap")
    assert plan == IdMap([(0, 1000, 1), (1, 600000, 65536)], [(0, 1001, 1), (1, 700000, 5000)], "subid")
    assert plan.warning is None
    assert plan.describe() == "subuid range 600000+65536, subgid range 700000+5000 via newuidmap/newgidmap"


def test_plan_single_without_ranges_says_how_to_add_them(tmp_path: Path) -> None:
    subuid, subgid = _subid_files(tmp_path, "other:100000:65536\n", "ci:100000:65536\n")
    plan = plan_idmap(1000, 1000, "ci", subuid, subgid, "/usr/bin/newuidmap", "/usr/bin/newgidmap")
    assert plan.kind == "single" and plan.uid_lines == plan.gid_lines == [(0, 1000, 1)]
    assert plan.warning is not None
    assert f"no range for ci in {subuid}" in plan.warning and str(subgid) not in plan.warning
    assert "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 ci" in plan.warning
    assert "uidmap" not in plan.warning


def test_plan_single_without_helpers_says_how_to_install_them(tmp_path: Path) -> None:
    subuid, subgid = _subid_files(tmp_path, "ci:100000:65536\n", "ci:100000:65536\n")
    plan = plan_idmap(1000, 1000, "ci", subuid, subgid, None, "/usr/bin/newgidmap")
    assert plan.kind == "single" and plan.warning is not None
    assert "newuidmap not found" in plan.warning and "apt-get install uidmap" in plan.warning
    assert "usermod" not in plan.warning
    both = plan_idmap(1000, 1000, "ci", tmp_path / "none", tmp_path / "none", None, None)
    assert both.warning is not None and "usermod" in both.warning and "newuidmap and newgidmap" in both.warning


def test_helper_is_privileged_needs_setuid_root_or_file_caps(tmp_path: Path) -> None:
    plain = tmp_path / "newuidmap"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o755)
    assert not helper_is_privileged(str(plain))
    assert not helper_is_privileged(str(tmp_path / "missing"))
    plain.chmod(0o4755)
    assert helper_is_privileged(str(plain)) == (plain.stat().st_uid == 0 and bool(plain.stat().st_mode & stat.S_ISUID))


def test_apply_idmap_reports_the_helpers_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "newuidmap"
    fake.write_text("#!/bin/sh\necho 'newuidmap: uid range [1-65537) -> [600000-665536) not allowed' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxError, match=r"refused to map ids.*not allowed") as e:
        apply_idmap(os.getpid(), SUBID_PLAN)
    assert e.value.hint and "/etc/subuid" in e.value.hint
    assert isinstance(e.value, BuildError)


def test_apply_idmap_to_a_missing_process_is_a_sandbox_error() -> None:
    with pytest.raises(SandboxError, match="cannot write /proc/2147483647/setgroups"):
        apply_idmap(2147483647, single_idmap(1000, 1000, "w"))


# -- host facts -----------------------------------------------------------------------------------------------------
def _reader(files: dict[str, str]) -> Callable[[str], str | None]:
    return files.get


def test_userns_fix_names_each_blocker() -> None:
    fix = userns_fix(1000, _reader({"/proc/sys/kernel/unprivileged_userns_clone": "0"}))
    assert "sysctl -w kernel.unprivileged_userns_clone=1" in fix
    assert userns_fix(0, _reader({"/proc/sys/kernel/unprivileged_userns_clone": "0"})).startswith(
        "user namespaces are refused"
    )  # root is not affected by that sysctl
    assert "sysctl -w user.max_user_namespaces=15000" in userns_fix(
        0, _reader({"/proc/sys/user/max_user_namespaces": "0"})
    )
    apparmor = userns_fix(1000, _reader({"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1"}))
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in apparmor
    seccomp = userns_fix(1000, _reader({"/proc/self/status": "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n"}))
    assert "seccomp" in seccomp and "seccomp=unconfined" in seccomp
    nothing = userns_fix(
        1000, _reader({"/proc/self/status": "Seccomp:\t0\n", "/proc/sys/user/max_user_namespaces": "9"})
    )
    assert "CONFIG_USER_NS" in nothing and "--isolation chroot" in nothing


def test_kernel_probe_wants_5_11_for_userxattr() -> None:
    assert kernel_probe("6.1.0-18-amd64").ok
    assert kernel_probe("5.11.0").ok
    old = kernel_probe("5.10.0-28-amd64")
    assert not old.ok and "5.11" in old.detail and "native" in old.fix
    assert kernel_probe("weird").ok  # not understood: overlay itself is probed anyway


def test_chroot_probe_reads_capabilities() -> None:
    assert chroot_probe(1000, 0x1FFFFFFFFFF).skipped
    everything = chroot_probe(0, 0x1FFFFFFFFFF)
    assert everything.ok and "CAP_SYS_ADMIN: yes" in everything.detail
    docker_default = chroot_probe(0, 0x00000000A80425FB)  # docker's default set: CHROOT, no SYS_ADMIN
    assert docker_default.ok and "CAP_SYS_ADMIN: no" in docker_default.detail
    none = chroot_probe(0, 0)
    assert not none.ok and "SYS_CHROOT" in none.fix


def test_deny_hook_fails_probes_without_running_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCI_SANDBOX_PROBE_DENY", "kernel, userns,idmap,mount,overlay,proc,chroot")
    p = probe.run_probes.__wrapped__(tmp_path)
    results = dict(p.results())
    for name in ("kernel", "userns", "idmap", "mount", "overlay", "proc", "chroot"):
        assert results[name].detail == probe.DENIED and not results[name].ok, name
    if os.geteuid() == 0:
        assert results["chroot-overlay"].detail == probe.DENIED  # "overlay" and "chroot" both deny it
    assert list(tmp_path.iterdir()) == []


# -- the chooser ----------------------------------------------------------------------------------------------------
def test_auto_prefers_userns_and_overlay() -> None:
    c = choose(probes=make_probes())
    assert (c.isolation, c.backend, c.idmap) == ("userns", "overlay", SUBID_PLAN)
    assert c.reasons[0] == "userns: user namespaces work; " + SUBID_PLAN.describe()
    assert c.reasons[1].startswith("overlay: ") and c.warnings == []


def test_single_uid_plan_and_missing_proc_are_warnings() -> None:
    single = single_idmap(1000, 1000, "single-uid mapping (…). Fix: usermod …")
    c = choose(probes=make_probes(plan=single, proc=fail("EPERM", "unmask /proc")))
    assert c.isolation == "userns" and c.idmap is single
    assert c.warnings[0] == single.warning
    assert "a fresh /proc cannot be mounted" in c.warnings[1] and "unmask /proc" in c.warnings[1]


def test_auto_falls_back_to_chroot_as_root() -> None:
    c = choose(probes=make_probes(0, userns=fail("unshare: Operation not permitted"), overlay=fail("n/a")))
    assert (c.isolation, c.backend) == ("chroot", "overlay")  # chroot uses the chroot-overlay probe
    assert "user namespaces do not work here (unshare: Operation not permitted)" in c.reasons[0]
    assert c.idmap.kind == "root"


def test_userns_without_mounts_does_not_count() -> None:
    c = choose(probes=make_probes(0, mount=fail("mount tmpfs: Permission denied")))
    assert c.isolation == "chroot" and "mount tmpfs: Permission denied" in c.reasons[0]


def test_chroot_without_mounts_warns_and_uses_native() -> None:
    p = make_probes(
        0,
        userns=fail("unshare: EPERM"),
        chroot_mount=fail("unshare: EPERM", "grant CAP_SYS_ADMIN"),
        chroot_overlay=fail("unshare: EPERM", "grant CAP_SYS_ADMIN"),
    )
    c = choose(probes=p)
    assert (c.isolation, c.backend) == ("chroot", "native")
    assert any("no mounts in the chroot sandbox" in w and "CAP_SYS_ADMIN" in w for w in c.warnings)


def test_nothing_works_unprivileged_raises_with_the_userns_fix() -> None:
    with pytest.raises(SandboxError, match="no sandbox isolation works here: userns: unshare: EPERM") as e:
        choose(probes=make_probes(userns=fail("unshare: EPERM", "sysctl -w kernel.unprivileged_userns_clone=1")))
    assert e.value.hint == "sysctl -w kernel.unprivileged_userns_clone=1"


def test_nothing_works_as_root_names_both() -> None:
    p = make_probes(0, userns=fail("unshare: EPERM", "seccomp"), chroot=fail("root without CAP_SYS_CHROOT"))
    with pytest.raises(SandboxError, match="userns: unshare: EPERM; chroot: root without CAP_SYS_CHROOT"):
        choose(probes=p)


def test_forced_userns_that_fails_raises_with_the_fix() -> None:
    with pytest.raises(SandboxError, match="--isolation userns does not work here: unshare: ENOSPC") as e:
        choose("userns", probes=make_probes(0, userns=fail("unshare: ENOSPC", "sysctl -w user.max_user_namespaces")))
    assert e.value.hint == "sysctl -w user.max_user_namespaces"


def test_forced_chroot_needs_root() -> None:
    with pytest.raises(SandboxError) as e:
        choose("chroot", probes=make_probes(1000))
    assert str(e.value) == (
        "chroot isolation needs root (it is for root inside an unprivileged container); use --isolation userns"
    )


def test_forced_chroot_as_root() -> None:
    c = choose("chroot", probes=make_probes(0))
    assert c.isolation == "chroot" and c.reasons[0].startswith("chroot: requested")
    with pytest.raises(SandboxError, match="--isolation chroot does not work here") as e:
        choose("chroot", probes=make_probes(0, chroot=fail("root without CAP_SYS_CHROOT", "--cap-add SYS_CHROOT")))
    assert e.value.hint == "--cap-add SYS_CHROOT"


def test_backend_rules() -> None:
    no_overlay = make_probes(overlay=fail("mount overlay: Invalid argument", "put the state dir on ext4"))
    c = choose(probes=no_overlay)
    assert (
        c.backend == "native" and c.reasons[1] == "native: overlay does not work here (mount overlay: Invalid argument)"
    )
    with pytest.raises(SandboxError, match="--backend overlay does not work with isolation userns") as e:
        choose(backend="overlay", probes=no_overlay)
    assert e.value.hint == "put the state dir on ext4"
    assert choose(backend="overlay", probes=make_probes()).backend == "overlay"
    c = choose(backend="native", probes=make_probes())
    assert c.backend == "native" and c.reasons[1] == "native: requested with --backend native"
    # chroot judges overlay by its own probe, not the user-namespace one
    chroot_no_overlay = make_probes(0, userns=fail("x"), chroot_overlay=fail("opaque dirs fail"))
    assert choose(probes=chroot_no_overlay).backend == "native"
    with pytest.raises(SandboxError, match="isolation chroot: opaque dirs fail"):
        choose(backend="overlay", probes=chroot_no_overlay)


def test_invalid_values_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        choose("docker", probes=make_probes())
    with pytest.raises(UsageError):
        choose(backend="btrfs", probes=make_probes())


# -- imgci doctor's rendering ---------------------------------------------------------------------------------------
def test_doctor_text_all_ok() -> None:
    report = doctor_report(make_probes(), scratch="/tmp")
    text = render_text(report)
    lines = text.splitlines()
    assert lines[0] == "ok    kernel: works"
    assert "skip  chroot-mount: not root" in lines
    assert "fix:" not in text
    assert lines[-1].startswith("builds will use: isolation=userns, backend=overlay (userns: user namespaces work;")
    assert report["ok"] is True and json.loads(json.dumps(report)) == report


def test_doctor_warns_for_what_builds_can_do_without() -> None:
    single = single_idmap(1000, 1000, "single-uid mapping. Fix: usermod x")
    p = make_probes(plan=single, idmap=fail("single-uid mapping", "usermod x"), overlay=fail("EINVAL", "use ext4"))
    report = doctor_report(p)
    text = render_text(report)
    assert "warn  idmap: single-uid mapping\n      fix: usermod x\n" in text
    assert "warn  overlay: EINVAL\n      fix: use ext4\n" in text
    assert "builds will use: isolation=userns, backend=native" in text
    assert "warning: single-uid mapping. Fix: usermod x" in text
    assert report["choice"]["idmap"] == {"kind": "single", "uid_map": [[0, 1000, 1]], "gid_map": [[0, 1000, 1]]}


def test_doctor_fails_when_no_isolation_works() -> None:
    report = doctor_report(make_probes(userns=fail("unshare: EPERM", "sysctl fix"), overlay=fail("unshare: EPERM")))
    rows = {r["name"]: r["status"] for r in report["probes"]}
    assert rows["userns"] == "fail" and rows["overlay"] == "warn" and rows["chroot"] == "skip"
    assert report["ok"] is False and report["choice"] is None
    assert report["error"] == {
        "message": "no sandbox isolation works here: userns: unshare: EPERM; chroot: not root",
        "hint": "sysctl fix",
    }
    text = render_text(report)
    assert "FAIL  userns: unshare: EPERM\n      fix: sysctl fix\n" in text
    assert text.endswith(
        "builds cannot run RUN steps here: " + report["error"]["message"] + "\n      fix: sysctl fix\n"
    )


def test_doctor_forced_overlay_failure_marks_overlay_fail() -> None:
    report = doctor_report(make_probes(overlay=fail("EINVAL", "use ext4")), backend="overlay")
    assert {r["name"]: r["status"] for r in report["probes"]}["overlay"] == "fail"
    assert report["error"]["hint"] == "use ext4"


def test_child_usage() -> None:
    from imgci.build.sandbox import probe_child

    assert probe_child.child_main([]) == 2
    assert probe_child.child_main(["--child", "nonsense", "/tmp"]) == 2
