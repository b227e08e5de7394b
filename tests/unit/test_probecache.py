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


def test_second_build_reads_the_cache_and_gets_the_same_probes(tmp_path: Path, counted: Counter) -> None:
    first = probecache.probes_for_build(tmp_path, tmp_path, counted)
    second = probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 1
    assert second == first == _probes()
    assert second.plan == first.plan and second.plan.kind == "subid"


def test_changed_facts_expiry_and_forget_probe_again(
    tmp_path: Path, counted: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    monkeypatch.setenv("IMGCI_SANDBOX_PROBE_DENY", "overlay")  # a different fingerprint
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 2
    cache = tmp_path / "cache" / "sandbox-probes.json"
    doc = json.loads(cache.read_text())
    doc["time"] -= probecache.MAX_AGE + 1
    cache.write_text(json.dumps(doc))
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 3
    probecache.forget(tmp_path)
    assert not cache.exists()
    probecache.probes_for_build(tmp_path, tmp_path, counted)
    assert len(counted) == 4


def test_a_corrupt_cache_is_ignored(tmp_path: Path, counted: Counter) -> None:
    cache = tmp_path / "cache" / "sandbox-probes.json"
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert probecache.probes_for_build(tmp_path, tmp_path, counted) == _probes()
    assert len(counted) == 1
    assert json.loads(cache.read_text())["probes"]["euid"] == 1000
