"""Conformance suite fixtures: the ``conformance`` marker, whether ``imgci build`` exists, the live reference.

Tests marked ``conformance`` build every case with ``imgci build``. Until the CLI has a ``build`` command they
are skipped with that reason (``IMGCI_CONFORMANCE=1`` makes them run, and fail, anyway), so that the rest
of the suite stays green while the engine is written; from the day ``imgci build`` exists they run.

Live comparison: when a docker daemon is reachable (``docker version`` answers; ``DOCKER_HOST`` as usual,
``IMGCI_CONFORMANCE_DOCKER`` picks the CLI), every case is also built with BuildKit and imgci is compared
with that build. ``IMGCI_CONFORMANCE_LIVE=1`` requires a reference (docker, else buildah) and fails without
one; buildah is used only then, since it differs from BuildKit in known ways (README.md).
``IMGCI_CONFORMANCE_IGNORE=key,key`` adds :func:`harness.compare` ignore keys (e.g. ``history.created_by``);
``IMGCI_CONFORMANCE_STRICT=1`` compares created_by strings exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import make_base_rootfs
from tests.conformance.references import BASE_TAG, Buildah, DockerBuildKit, Reference, Session, start_session

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "conformance: builds tests/conformance cases with imgci build and compares with the references"
    )


def _imgci_has_build() -> bool:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "imgci", "build", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    return proc.returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [i for i in items if i.get_closest_marker("conformance")]
    if not marked or os.environ.get("IMGCI_CONFORMANCE") == "1" or _imgci_has_build():
        return
    skip = pytest.mark.skip(reason="imgci has no `build` command yet (IMGCI_CONFORMANCE=1 runs these anyway)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def conformance_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base root file system of every case (busybox + users app/svc, groups staff/app/other)."""
    return make_base_rootfs(tmp_path_factory.mktemp("conformance-rootfs") / "base-rootfs.tar")


@pytest.fixture(scope="session")
def live_reference(
    tmp_path_factory: pytest.TempPathFactory, conformance_rootfs: Path
) -> Iterator[tuple[Reference, Session] | None]:
    """A reference builder session (BuildKit preferred, else buildah), or None when none is usable here."""
    required = os.environ.get("IMGCI_CONFORMANCE_LIVE") == "1"
    ref: Reference | None = None
    docker = DockerBuildKit()
    if docker.available():
        ref = docker
    elif required:
        buildah = Buildah()
        if buildah.available():
            ref = buildah
        else:
            buildah.close()
    if ref is None:
        if required:
            pytest.fail("IMGCI_CONFORMANCE_LIVE=1 but neither a docker daemon nor buildah is usable")
        yield None
        return
    session = start_session(ref, tmp_path_factory.mktemp(f"live-{ref.name}"), conformance_rootfs)
    try:
        yield ref, session
    finally:
        ref.remove(*(b.tag for b in session.built.values()), BASE_TAG)
        ref.close()
