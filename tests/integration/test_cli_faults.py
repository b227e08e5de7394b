"""Crashes and resource faults around pull: kill -9 mid-download, and a full disk under the state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Imgci
from tests.infra.faultproxy import FaultProxy, delay
from tests.infra.registry import RegistryServer


def _big_image(imgci: Imgci, tmp_path: Path, registry_host: str, repo: str, size: int = 4 << 20) -> str:
    """Push an image whose single layer is ``size`` random (incompressible) bytes; return its name."""
    tar_path = tmp_path / "big.tar"
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(size))
    with tarfile.open(tar_path, "w") as tar:
        tar.add(payload, arcname="data/payload.bin")
    name = f"{registry_host}/{repo}:1"
    imgci.run("import", str(tar_path), name)
    imgci.run("push", name)
    return name


@pytest.mark.parametrize("kill_after", [0.3, 1.0, 1.8])
def test_kill_9_during_pull_then_rerun(
    imgci: Imgci, imgci_factory: object, registry: RegistryServer, tmp_path: Path, kill_after: float
) -> None:
    with FaultProxy(registry.url) as proxy:
        name = _big_image(imgci, tmp_path, proxy.host, f"crash/pull{int(kill_after * 10)}")
        proxy.add_fault("GET", r"/blobs/sha256:", times=None, action=delay(0.8))
        puller = imgci_factory()  # type: ignore[operator]
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgci", "pull", name],
            env=puller.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert "ok:" in puller.run("fsck").stdout  # whatever was done is intact; nothing half-written is visible
        assert puller.run("ls", "-q").stdout.split() in ([], [name])
        proxy.clear_faults()
        puller.run("pull", name)
        assert puller.run("ls", "-q").stdout.split() == [name]
        assert "ok:" in puller.run("fsck").stdout
        puller.run("prune")  # sweeps the killed process's temp files
        assert list((puller.state / "ingest").iterdir()) == []


def test_disk_full_during_pull_is_clear_and_keeps_the_store(
    imgci: Imgci, registry: RegistryServer, tmp_path: Path, busybox_tar: Path
) -> None:
    name = _big_image(imgci, tmp_path, registry.host, "diskfull/big", size=3 << 20)
    state = tmp_path / "small-state"
    state.mkdir()
    # Inside a private user+mount namespace: a 2 MiB tmpfs as the state dir (the network stays the host's loopback).
    script = f"""
set -u
mount -t tmpfs -o size=2m none "{state}"
imgci() {{ "{sys.executable}" -m imgci --state "{state}" "$@"; }}
imgci import "{busybox_tar}" localhost/small:1 >/dev/null || {{ echo "IMPORT FAILED"; exit 1; }}
imgci pull "{name}"; echo "PULL_EXIT=$?"
imgci fsck; echo "FSCK_EXIT=$?"
imgci ls -q
echo "INGEST=$(ls -A "{state}/ingest" | wc -l)"
"""
    env = {**imgci.environ(), "PYTHONPATH": str(REPO)}
    env.pop("IMGCI_STATE")
    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert "PULL_EXIT=1" in text, text
    assert "error: no space left" in text, text
    assert "Traceback" not in text
    assert "FSCK_EXIT=0" in text, text
    assert "localhost/small:1" in out.stdout
    assert name not in out.stdout.split("FSCK_EXIT")[1]
    assert "INGEST=0" in text, text
