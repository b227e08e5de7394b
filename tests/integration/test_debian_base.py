"""The Debian base image fixtures (tests/infra/debian.py, tests/conftest.py): the cached rootfs tar is a proper
image rootfs, and imgci can import it, build on it (locally and from the registry) and unpack the result.

The first run builds the tar with debootstrap (~25 s, needs deb.debian.org); later runs reuse the cache.
"""

from __future__ import annotations

import json
import os
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import DEBIAN_IMAGE, Imgci, import_debian
from tests.infra.debian import APT_UID, DebianRootfsError, debian_rootfs_tar, find_debootstrap

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def members(debian_tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(debian_tar) as tar:
        return {m.name: m for m in tar.getmembers()}


def _passwd(debian_tar: Path) -> dict[str, list[str]]:
    with tarfile.open(debian_tar) as tar:
        f = tar.extractfile("etc/passwd")
        assert f is not None
        return {line.split(":")[0]: line.split(":") for line in f.read().decode().splitlines()}


def test_tar_is_cached_and_reused(debian_tar: Path) -> None:
    before = debian_tar.stat()
    assert debian_rootfs_tar(debian_tar.parent) == debian_tar  # found, not rebuilt
    assert debian_tar.stat().st_mtime_ns == before.st_mtime_ns
    assert "bookworm" in debian_tar.name and "minbase" in debian_tar.name
    assert before.st_mode & 0o777 == 0o644  # readable by the rootless test user too


def test_tar_has_the_tools_the_run_tests_need(members: dict[str, tarfile.TarInfo], debian_tar: Path) -> None:
    for tool in ("usr/bin/apt-get", "usr/bin/dpkg", "usr/sbin/useradd", "usr/bin/bash", "usr/bin/sh"):
        assert tool in members, tool
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"  # merged /usr
    users = _passwd(debian_tar)
    assert users["root"][2:4] == ["0", "0"]
    assert users["_apt"][2] == str(APT_UID)


def test_tar_is_an_image_rootfs_not_a_chroot(members: dict[str, tarfile.TarInfo], debian_tar: Path) -> None:
    names = list(members)
    assert not [n for n, m in members.items() if m.ischr() or m.isblk() or m.isfifo()]
    for empty in ("dev", "proc", "sys", "tmp"):
        assert members[empty].isdir()
        assert not [n for n in names if n.startswith(f"{empty}/")], empty
    for absent in ("etc/resolv.conf", "etc/hostname", "etc/hosts"):
        assert absent not in members
    # No apt lists or downloaded packages: a Dockerfile must `apt-get update` first, as with Debian's images.
    assert [n for n in names if n.startswith("var/lib/apt/lists/")] == ["var/lib/apt/lists/partial"]
    assert [n for n in names if n.startswith("var/cache/apt/")] == [
        "var/cache/apt/archives",
        "var/cache/apt/archives/partial",
    ]
    with tarfile.open(debian_tar) as tar:
        f = tar.extractfile("etc/apt/sources.list")
        assert f is not None
        sources = f.read().decode()
    for suite in ("bookworm main", "bookworm-updates main", "bookworm-security main"):
        assert suite in sources
    docs = [n for n, m in members.items() if n.startswith("usr/share/doc/") and m.isfile()]
    assert docs and all(n.endswith("/copyright") for n in docs)  # as in Debian's slim images
    assert not [n for n in names if n.startswith(("usr/share/man/", "usr/share/locale/"))]
    assert {"usr/share/doc", "usr/share/man", "usr/share/locale"} <= set(names)


def test_tar_keeps_numeric_owners_modes_and_order(members: dict[str, tarfile.TarInfo]) -> None:
    for partial in ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        m = members[partial]
        assert (m.uid, m.gid, m.mode) == (APT_UID, 0, 0o700), partial  # _apt:root, as apt leaves it
    shadow = members["etc/shadow"]
    assert (shadow.uid, shadow.gid, shadow.mode) == (0, 42, 0o640)  # group shadow
    assert members["usr/bin/passwd"].mode & 0o4000  # setuid kept
    assert members["tmp"].mode == 0o1777
    assert all(m.uname == "" and m.gname == "" for m in members.values())  # numbers only, like --numeric-owner
    position = {name: i for i, name in enumerate(members)}
    for name, i in position.items():  # every parent directory comes before its children
        parent = str(PurePosixPath(name).parent)
        assert parent == "." or position[parent] < i


def test_missing_debootstrap_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(DebianRootfsError, match="apt-get install debootstrap"):
        find_debootstrap(search_path=str(tmp_path))


def _context(tmp_path: Path, dockerfile: str, files: dict[str, str]) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    for name, data in files.items():
        (ctx / name).write_text(data)
    return ctx


def _assert_debian_tree(root: Path) -> None:
    assert (root / "usr/bin/apt-get").is_file()
    assert os.readlink(root / "bin") == "usr/bin"
    if os.geteuid() == 0:  # only root can give files away when unpacking
        st = (root / "var/cache/apt/archives/partial").stat()
        assert (st.st_uid, st.st_gid) == (APT_UID, 0)
        assert (root / "etc/shadow").stat().st_gid == 42
    assert not any((root / "dev").iterdir())


def test_import_build_and_unpack(imgci: Imgci, debian_image: str, tmp_path: Path) -> None:
    assert debian_image == DEBIAN_IMAGE
    config = json.loads(imgci.run("inspect", debian_image, "--type", "config").stdout)["config"]
    assert config["Cmd"] == ["bash"]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in config["Env"]
    ctx = _context(
        tmp_path,
        f"""
        FROM {debian_image}
        COPY app.txt /srv/app/app.txt
        ENV APP_HOME=/srv/app
        """,
        {"app.txt": "hello from the context\n"},
    )
    imgci.run("build", "-t", "test/on-debian:1", str(ctx))
    built = json.loads(imgci.run("inspect", "test/on-debian:1", "--type", "config").stdout)
    assert "APP_HOME=/srv/app" in built["config"]["Env"]
    assert built["config"]["Cmd"] == ["bash"]
    out = tmp_path / "unpacked"
    imgci.run("unpack", "test/on-debian:1", "-o", str(out))
    assert (out / "srv/app/app.txt").read_text() == "hello from the context\n"
    _assert_debian_tree(out)


def test_build_from_the_registry_copy(
    imgci_factory: Callable[[], Imgci], debian_registry_image: str, debian_tar: Path, tmp_path: Path
) -> None:
    assert debian_registry_image.endswith("/base/debian:bookworm")
    fresh = imgci_factory()  # an empty store: the base comes from the registry
    ctx = _context(tmp_path, f"FROM {debian_registry_image}\nCOPY f /f\n", {"f": "pulled\n"})
    fresh.run("build", "-t", "test/on-registry-debian:1", str(ctx))
    out = tmp_path / "unpacked"
    fresh.run("unpack", "test/on-registry-debian:1", "-o", str(out))
    assert (out / "f").read_text() == "pulled\n"
    _assert_debian_tree(out)
    # Importing the same tar elsewhere gives the same layer the registry holds (the import is deterministic).
    local = imgci_factory()
    import_debian(local, debian_tar, debian_registry_image)
    local_layers = json.loads(local.run("inspect", debian_registry_image, "--type", "config").stdout)["rootfs"]
    pulled_layers = json.loads(fresh.run("inspect", debian_registry_image, "--type", "config").stdout)["rootfs"]
    assert local_layers == pulled_layers
