"""Shared fixtures: isolated state and docker config per test, the imgci CLI as a subprocess, real registries.

Registries are session-scoped (one of each kind, started on first use, stopped at the end); tests use distinct
repository names so they do not see each other's images. Each test gets its own state dir and DOCKER_CONFIG.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra.debian import debian_rootfs_tar
from tests.infra.registry import RegistryServer
from tests.infra.rootfs import make_busybox_rootfs_tar

pytest_plugins = ["tests.integration.conftest_registry"]

REPO = Path(__file__).resolve().parents[1]
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Imgci:
    """Runs ``python -m imgci`` with its own state dir and docker config, as a user would."""

    state: Path
    docker_config: Path
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGCI_", "DOCKER_"))}
        env.update(
            IMGCI_STATE=str(self.state),
            DOCKER_CONFIG=str(self.docker_config),
            PYTHONPATH=str(REPO),
            CI="true",
        )
        env.update(self.env)
        return env

    def run(
        self, *args: str, input: str | bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        text_input = input.decode() if isinstance(input, bytes) else input
        proc = subprocess.run(
            [sys.executable, "-m", "imgci", *args],
            input=text_input,
            capture_output=True,
            text=True,
            env=self.environ(),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"imgci {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def fails(self, *args: str, input: str | None = None, code: int = 1) -> str:
        """Run a command that must fail cleanly: the given exit code, an ``error:`` line, no traceback."""
        proc = self.run(*args, input=input, check=False)
        assert proc.returncode == code, f"expected exit {code}, got {proc.returncode}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr, proc.stderr
        return proc.stderr

    def trust(self, ca_path: Path, workdir: Path) -> None:
        """Trust ``ca_path`` the way the README tells users to: a bundle in REQUESTS_CA_BUNDLE."""
        bundle = workdir / "ca-bundle.pem"
        system = SYSTEM_CA_BUNDLE.read_text() if SYSTEM_CA_BUNDLE.exists() else ""
        bundle.write_text(system + "\n" + ca_path.read_text())
        self.env["REQUESTS_CA_BUNDLE"] = str(bundle)


@pytest.fixture
def imgci(tmp_path: Path) -> Imgci:
    (tmp_path / "docker").mkdir()
    return Imgci(state=tmp_path / "state", docker_config=tmp_path / "docker")


@pytest.fixture
def imgci_factory(tmp_path: Path) -> Iterator[object]:
    """Make more CLIs with their own state (e.g. to pull into an empty store), sharing the docker config."""
    (tmp_path / "docker").mkdir(exist_ok=True)
    count = 0

    def make() -> Imgci:
        nonlocal count
        count += 1
        return Imgci(state=tmp_path / f"state{count}", docker_config=tmp_path / "docker")

    yield make


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs_tar(tmp_path_factory.mktemp("rootfs") / "busybox-rootfs.tar")


@pytest.fixture
def busybox(imgci: Imgci, busybox_tar: Path) -> str:
    """``localhost/busybox:latest`` imported into this test's state dir; returns the name."""
    imgci.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    return "localhost/busybox:latest"


DEBIAN_CHANGES = ("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["bash"]')
DEBIAN_IMAGE = "localhost/debian:bookworm"


def import_debian(cli: Imgci, tar: Path, name: str = DEBIAN_IMAGE) -> str:
    """Import the Debian rootfs tar into ``cli``'s state as ``name`` (PATH and CMD as Debian's images set them)."""
    changes = [arg for change in DEBIAN_CHANGES for arg in ("--change", change)]
    cli.run("import", str(tar), name, *changes)
    return name


@pytest.fixture(scope="session")
def debian_tar() -> Path:
    """The cached Debian bookworm minbase rootfs tar (tests/infra/debian.py); built on first use (~25 s, network)."""
    return debian_rootfs_tar()


@pytest.fixture
def debian_image(imgci: Imgci, debian_tar: Path) -> str:
    """``localhost/debian:bookworm`` imported into this test's state dir; returns the name."""
    return import_debian(imgci, debian_tar)


@pytest.fixture(scope="session")
def debian_registry_image(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer, debian_tar: Path) -> str:
    """The Debian image pushed once to the session ``registry`` as ``<host>/base/debian:bookworm``; returns that
    reference, for ``FROM`` in tests whose own state starts empty."""
    workdir = tmp_path_factory.mktemp("debian-push")
    (workdir / "docker").mkdir()
    cli = Imgci(state=workdir / "state", docker_config=workdir / "docker")
    ref = import_debian(cli, debian_tar, f"{registry.host}/base/debian:bookworm")
    cli.run("push", ref)
    return ref


def _session_registry(tmp_path_factory: pytest.TempPathFactory, **kwargs: object) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry"), **kwargs) as reg:  # type: ignore[arg-type]
        yield reg


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Plain HTTP registry on loopback (imgci allows HTTP for loopback, like docker)."""
    yield from _session_registry(tmp_path_factory)


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _session_registry(tmp_path_factory, tls=True)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """htpasswd Basic auth over TLS."""
    yield from _session_registry(tmp_path_factory, tls=True, auth="basic")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """Bearer-token auth; anonymous users may pull."""
    yield from _session_registry(tmp_path_factory, auth="token")
