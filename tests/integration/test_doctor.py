"""``imgci doctor`` on this machine for real: as root, with probes denied, inside a namespace that refuses user
namespaces (the situation of root in a locked-down container), and as real unprivileged users with and without
/etc/subuid ranges."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imgci.build.sandbox.idmap import read_subids
from tests.conftest import Imgci
from tests.integration.rootless import RootlessUser

pytestmark = pytest.mark.integration

NO_RANGE_USER = "imgci-nosubid"


def doctor_json(imgci: Imgci, *args: str, code: int = 0) -> dict[str, Any]:
    proc = imgci.run("doctor", "--format", "json", *args, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {row["name"]: row["status"] for row in report["probes"]}


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> RootlessUser:
    return RootlessUser.create(tmp_path_factory.mktemp("rootless"))


def test_doctor_here_picks_userns_and_overlay(imgci: Imgci) -> None:
    imgci.state.mkdir()  # probes run on the state directory's filesystem when it exists
    start = time.monotonic()
    proc = imgci.run("doctor")
    elapsed = time.monotonic() - start
    lines = proc.stdout.splitlines()
    for name in ("kernel", "userns", "idmap", "mount", "overlay", "proc"):
        assert any(line.startswith(f"ok    {name}: ") for line in lines), proc.stdout
    assert "FAIL" not in proc.stdout and proc.stderr == ""
    assert "builds will use: isolation=userns, backend=overlay (userns: user namespaces work;" in proc.stdout
    assert elapsed < 10, f"doctor took {elapsed:.1f}s"  # ~0.4 s on an idle 2-core machine; generous under load

    report = doctor_json(imgci)
    assert report["ok"] is True and report["error"] is None
    assert report["choice"]["isolation"] == "userns" and report["choice"]["backend"] == "overlay"
    if os.geteuid() == 0:
        assert all(s == "ok" for s in statuses(report).values()), report["probes"]
        assert report["choice"]["idmap"]["kind"] == "root"
    assert report["scratch"] == str(imgci.state)
    assert list(imgci.state.iterdir()) == []  # every probe directory was removed


def test_doctor_forced_choices(imgci: Imgci) -> None:
    report = doctor_json(imgci, "--backend", "native")
    assert report["choice"]["backend"] == "native"
    if os.geteuid() == 0:
        report = doctor_json(imgci, "--isolation", "chroot")
        assert report["choice"]["isolation"] == "chroot" and report["choice"]["backend"] == "overlay"
    else:
        report = doctor_json(imgci, "--isolation", "chroot", code=1)
        assert report["error"]["message"].startswith("chroot isolation needs root")


@pytest.mark.skipif(os.geteuid() != 0, reason="the chroot fallback is for root")
def test_denied_userns_falls_back_to_chroot_as_root(imgci: Imgci) -> None:
    imgci.env["IMGCI_SANDBOX_PROBE_DENY"] = "userns"
    report = doctor_json(imgci)
    rows = {row["name"]: row for row in report["probes"]}
    assert rows["userns"]["status"] == "warn" and rows["userns"]["detail"] == "denied by IMGCI_SANDBOX_PROBE_DENY"
    assert report["choice"]["isolation"] == "chroot" and report["choice"]["backend"] == "overlay"
    assert "user namespaces do not work here (denied by IMGCI_SANDBOX_PROBE_DENY)" in report["choice"]["reasons"][0]

    imgci.env["IMGCI_SANDBOX_PROBE_DENY"] = "userns,chroot"
    proc = imgci.run("doctor", check=False)
    assert proc.returncode == 1, proc.stdout
    assert "FAIL  userns: denied by IMGCI_SANDBOX_PROBE_DENY" in proc.stdout
    assert "FAIL  chroot: denied by IMGCI_SANDBOX_PROBE_DENY" in proc.stdout
    assert "builds cannot run RUN steps here: no sandbox isolation works here" in proc.stdout


def test_root_of_a_namespace_without_nested_userns(imgci: Imgci) -> None:
    """Root in a container that refuses user namespaces: user.max_user_namespaces=0 inside a user namespace."""
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    doctor = [sys.executable, "-m", "imgci", "doctor", "--format", "json"]
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *doctor],
        capture_output=True,
        text=True,
        env=imgci.environ(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["name"]: row for row in report["probes"]}
    assert rows["userns"]["status"] == "warn" and "No space left on device" in rows["userns"]["detail"]
    assert "sysctl -w user.max_user_namespaces=15000" in rows["userns"]["fix"]
    assert rows["chroot"]["status"] == "ok" and rows["chroot-mount"]["status"] == "ok"
    # root of a user namespace cannot set overlay's trusted.* xattrs: opaque directories fail, so no overlay
    assert rows["chroot-overlay"]["status"] == "warn" and "opaque" in rows["chroot-overlay"]["detail"]
    assert report["choice"]["isolation"] == "chroot" and report["choice"]["backend"] == "native"


def _unprivileged_doctor(user: RootlessUser, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run doctor as ``user`` with a state dir it owns, so the probes work there; check they leave nothing behind."""
    home = user.private_dir()
    try:
        state = user.private_dir(home)
        extra = {"IMGCI_STATE": str(state), **(env or {})}
        proc = user.run([user.python, "-m", "imgci", "doctor", "--format", "json", *args], env=extra, check=False)
        report: dict[str, Any] = json.loads(proc.stdout)
        assert proc.returncode == (0 if report["ok"] else 1)
        assert report["scratch"] == str(state)
        assert list(state.iterdir()) == []  # overlay's mode-000 work dirs included: the user could remove them
        return report
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_unprivileged_user_gets_its_subid_range(user: RootlessUser) -> None:
    ranges = read_subids(Path("/etc/subuid"), user.name, user.uid)
    gid_ranges = read_subids(Path("/etc/subgid"), user.name, user.uid)
    report = _unprivileged_doctor(user)
    rows = {row["name"]: row for row in report["probes"]}
    assert report["ok"] is True and report["choice"]["isolation"] == "userns"
    for name in ("userns", "mount", "overlay", "proc"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["chroot"]["status"] == "skip"
    if ranges and gid_ranges:  # always, when the tests run as root: RootlessUser adds the ranges
        first, gfirst = ranges[0], gid_ranges[0]
        assert rows["idmap"]["status"] == "ok"
        assert rows["idmap"]["detail"].startswith(f"subuid range {first.start}+{first.count}")
        assert report["choice"]["idmap"] == {
            "kind": "subid",
            "uid_map": [[0, user.uid, 1], [1, first.start, first.count]],
            "gid_map": [[0, user.gid, 1], [1, gfirst.start, gfirst.count]],
        }
        assert f"subuid range {first.start}+{first.count}" in report["choice"]["reasons"][0]

    report = _unprivileged_doctor(user, "--isolation", "chroot")
    assert report["ok"] is False and report["error"]["message"].startswith("chroot isolation needs root")


def test_unprivileged_user_where_user_namespaces_are_refused(user: RootlessUser) -> None:
    """A non-root uid in a namespace whose user.max_user_namespaces is 0: nothing works, and doctor says why."""
    if not read_subids(Path("/etc/subuid"), user.name, user.uid):
        pytest.skip(f"{user.name} has no /etc/subuid range, which unshare --map-auto needs for a non-root uid inside")
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --reuid=1000 --regid=1000 --clear-groups "$@"'
    doctor = [user.python, "-m", "imgci", "doctor", "--format", "json"]
    proc = user.run(
        ["unshare", "--user", "--map-root-user", "--map-auto", "sh", "-c", script, "sh", *doctor], check=False
    )
    assert proc.returncode == 1, proc.stdout.decode() + proc.stderr.decode()
    report = json.loads(proc.stdout)
    rows = {row["name"]: row for row in report["probes"]}
    assert rows["userns"]["status"] == "fail" and "No space left on device" in rows["userns"]["detail"]
    assert "sysctl -w user.max_user_namespaces=15000" in rows["userns"]["fix"]
    assert rows["mount"]["status"] == "warn" and rows["mount"]["fix"].startswith("user namespaces must work first")
    assert rows["chroot"]["status"] == "skip"
    assert report["choice"] is None and report["error"]["message"].startswith("no sandbox isolation works here")
    assert "sysctl -w user.max_user_namespaces=15000" in report["error"]["hint"]


def _user_without_ranges(user: RootlessUser) -> tuple[RootlessUser, dict[str, str]]:
    """As root: a second real user with no /etc/subuid entry. Otherwise: this user with empty subid files."""
    if os.geteuid() != 0:
        return user, {"IMGCI_SUBUID_FILE": "/dev/null", "IMGCI_SUBGID_FILE": "/dev/null"}
    try:
        pw = pwd.getpwnam(NO_RANGE_USER)
    except KeyError:
        # useradd gives new users a subid range on its own when login.defs has SUB_UID_COUNT (Debian 12 does)
        no_subids = ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]
        subprocess.run(
            ["useradd", "--create-home", "--user-group", *no_subids, NO_RANGE_USER], check=True, capture_output=True
        )
        pw = pwd.getpwnam(NO_RANGE_USER)
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        assert not read_subids(path, pw.pw_name, pw.pw_uid), f"{NO_RANGE_USER} unexpectedly has a range in {path}"
    other = RootlessUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), user.python, user.pythonpath)
    return other, {}


@pytest.mark.parametrize("how", ["no-range-user", "subid-file-hook"])
def test_unprivileged_user_without_ranges_gets_single_uid_and_the_fix(user: RootlessUser, how: str) -> None:
    if how == "no-range-user":
        who, env = _user_without_ranges(user)
    else:
        who, env = user, {"IMGCI_SUBUID_FILE": "/dev/null", "IMGCI_SUBGID_FILE": "/dev/null"}
    report = _unprivileged_doctor(who, env=env)
    rows = {row["name"]: row for row in report["probes"]}
    fix = f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who.name}"
    assert rows["idmap"]["status"] == "warn" and fix in rows["idmap"]["fix"], rows["idmap"]
    assert rows["idmap"]["detail"].startswith(f"single-uid mapping: root inside is uid {who.uid} outside")
    assert report["ok"] is True and report["choice"]["isolation"] == "userns"
    assert report["choice"]["idmap"]["kind"] == "single"
    assert report["choice"]["idmap"]["uid_map"] == [[0, who.uid, 1]]
    assert any(fix in w for w in report["choice"]["warnings"])
