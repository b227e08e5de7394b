"""The probe cache: round trip, fingerprint, expiry and forget (probing itself replaced by a counter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgci.build.sandbox import probecache
from imgci.build.sandbox.idmap import IdMap
from imgci.build.sandbox.probe import ProbeResult, Probes


def _probes() -> Probes:
    ok = ProbeResult(True, "fine")
    bad = ProbeResult(False, "refused", "do this", skipped=False)
    return Probes(
        euid=1000,
        kernel=ok,
        userns=ok,
        idmap=ok,
        mount=ok,
        overlay=bad,
        proc=ok,
        chroot=ProbeResult(False, "not root", skipped=True),
        chroot_mount=bad,
        chroot_overlay=bad,
        chroot_proc=bad,
        plan=IdMap([(0, 1000, 1), (1, 100000, 65536)], [(0, 1000, 1), (1, 100000, 65536)], "subid"),
    )


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, scratch: Path) -> Probes:
        self.calls += 1
        return _probes()

    def __len__(self) -> int:
        return self.calls


@pytest.fixture
def counted() -> Counter:
    return Counter()


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user-level cache directory, inside the test's tmp dir (never the real ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "imgci" / "sandbox-probes.json"


def test_second_build_reads_the_cache_and_gets_the_same_probes(tmp_path: Path, counted: Counter) -> None:
    first = probecache.probes_for_build(tmp_path, tmp_path, counted)
    second = probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 1
    assert second == first == _probes()
    assert second.plan == first.plan and second.plan.kind == "subid"


def test_changed_facts_expiry_and_forget_probe_again(
    tmp_path: Path, counted: Counter, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    monkeypatch.setenv("IMGCI_SANDBOX_PROBE_DENY", "overlay")  # a different fingerprint
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 2
    cache = tmp_path / "cache" / "sandbox-probes.json"
    for path in (cache, user_cache):
        doc = json.loads(path.read_text())
        doc["time"] -= probecache.MAX_AGE + 1
        path.write_text(json.dumps(doc))
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 3
    probecache.forget(tmp_path)
    assert not cache.exists() and not user_cache.exists()
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 4


def test_a_fresh_state_dir_on_the_same_file_system_reuses_the_user_cache(
    tmp_path: Path, counted: Counter, user_cache: Path
) -> None:
    first, second = tmp_path / "state1", tmp_path / "state2"
    for d in (first, second):
        (d / "tmp").mkdir(parents=True)
    probecache.probes_for_build(first, first / "tmp", counted)
    assert user_cache.exists()
    assert probecache.probes_for_build(second, second / "tmp", counted) == _probes()
    assert len(counted) == 1  # a CI job's new state dir: no probing again


def test_a_corrupt_cache_is_ignored(tmp_path: Path, counted: Counter) -> None:
    cache = tmp_path / "cache" / "sandbox-probes.json"
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert probecache.probes_for_build(tmp_path, tmp_path, counted) == _probes()
    assert len(counted) == 1
    assert json.loads(cache.read_text())["probes"]["euid"] == 1000
