"""RUN on a real Debian base (tests/infra/debian.py): apt-get from Debian's mirror, useradd, ownership in layers.

- As a real unprivileged user with /etc/subuid and /etc/subgid ranges (the rootless path, newuidmap/newgidmap):
  ``apt-get update && apt-get install hello`` (apt drops to its ``_apt`` user, which needs the subordinate ids)
  and ``useradd``; the image's layers carry the new user's ownership.
- As root, the same Dockerfile in every isolation and snapshotter combination gives the same image, byte for byte
  (with SOURCE_DATE_EPOCH), so the four code paths agree on whiteouts, ownership, modes and hardlinks.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DEBIAN_CHANGES, Imgci
from tests.integration.rootless import RootlessUser

APT_DOCKERFILE = """
FROM localhost/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends hello && rm -rf /var/lib/apt/lists/*
RUN useradd -m -u 1500 appuser && install -d -o appuser -g appuser -m 0750 /srv/app
USER appuser
RUN hello > /srv/app/greeting && id > /srv/app/id
"""


def _layers(archive: Path) -> list[dict[str, tarfile.TarInfo]]:
    """Every layer of a docker-archive as {name: member}."""
    out = []
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in manifest[0]["Layers"]:
            raw = outer.extractfile(name).read()  # type: ignore[union-attr]
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            with tarfile.open(fileobj=io.BytesIO(raw)) as layer:
                out.append({m.name.rstrip("/"): m for m in layer.getmembers()})
    return out


def _read(archive: Path, path: str) -> bytes:
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in reversed(manifest[0]["Layers"]):
            raw = outer.extractfile(name).read()  # type: ignore[union-attr]
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            with tarfile.open(fileobj=io.BytesIO(raw)) as layer:
                try:
                    f = layer.extractfile(path)
                except KeyError:
                    continue
                assert f is not None
                return f.read()
    raise KeyError(path)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> RootlessUser:
    return RootlessUser.create(tmp_path_factory.mktemp("rootless"))


def test_rootless_apt_get_install_and_useradd(user: RootlessUser, debian_tar: Path) -> None:
    home = user.private_dir()
    try:
        tar = home / "debian.tar"
        shutil.copy(debian_tar, tar)
        os.chmod(tar, 0o644)
        ctx = home / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(textwrap.dedent(APT_DOCKERFILE).lstrip())
        if os.geteuid() == 0:
            for p in [home, *home.rglob("*")]:
                os.chown(p, user.uid, user.gid)
        state = home / "state"
        changes = [a for c in DEBIAN_CHANGES for a in ("--change", c)]
        user.imgci("import", str(tar), "localhost/debian:bookworm", *changes, state=state)
        env = {"IMGCI_STATE": str(state), "DOCKER_CONFIG": str(home / "docker")}
        proc = user.run(
            [user.python, "-m", "imgci", "build", "-t", "rootless/apt:1", "--progress", "plain", str(ctx)], env=env
        )
        log = proc.stderr.decode()
        assert "newuidmap" in log  # the subordinate-id mapping was used, not the single-uid fallback
        assert "Setting up hello" in log
        archive = home / "apt.tar"
        user.imgci("save", "rootless/apt:1", "-o", str(archive), state=state)
        layers = _layers(archive)
        assert len(layers) == 4
        apt, useradd, final = layers[1], layers[2], layers[3]
        hello = apt["usr/bin/hello"]
        assert hello.isfile() and hello.mode & 0o111 and (hello.uid, hello.gid) == (0, 0)
        assert not [n for n in apt if n.startswith("var/lib/apt/lists/") and apt[n].isfile() and ".wh." not in n]
        assert "appuser:x:1500:1500:" in _read(archive, "etc/passwd").decode()
        srv = useradd["srv/app"]
        assert srv.isdir() and (srv.uid, srv.gid, srv.mode) == (1500, 1500, 0o750)
        assert (useradd["home/appuser"].uid, useradd["home/appuser"].gid) == (1500, 1500)
        greeting = final["srv/app/greeting"]
        assert (greeting.uid, greeting.gid) == (1500, 1500)
        assert _read(archive, "srv/app/greeting") == b"Hello, world!\n"
        assert _read(archive, "srv/app/id").startswith(b"uid=1500(appuser) gid=1500(appuser)")
        # nothing of the build is left running or mounted, and the work directories are gone
        assert not list((state / "tmp").glob("run-*"))
        assert str(state) not in Path("/proc/self/mountinfo").read_text()
        # prune removes what only the build used (snapshots owned by subordinate ids) without root
        user.imgci("rm", "rootless/apt:1", state=state)
        user.imgci("rm", "localhost/debian:bookworm", state=state)
        user.imgci("prune", state=state)
        leftovers = [p for p in (state / "snapshots").rglob("*") if p.parent.parent == state / "snapshots"]
        assert leftovers == []
    finally:
        shutil.rmtree(home, ignore_errors=True)


MODES_DOCKERFILE = """
FROM localhost/debian:bookworm
RUN useradd -m -u 1500 appuser && install -d -o appuser -m 0750 /srv/app && echo hi > /srv/app/f \\
    && chown appuser:appuser /srv/app/f && ln /srv/app/f /srv/app/hard && ln -s /srv/app/f /srv/link \\
    && rm -rf /usr/share/doc /etc/motd /var/cache/apt && chmod 4750 /srv/app/f \\
    && rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d && echo new > /etc/apt/apt.conf.d/n
RUN chown appuser /etc/debian_version && chmod 640 /etc/debian_version
"""


@pytest.mark.parametrize("isolation", ["userns", "chroot"])
def test_root_builds_agree_across_isolations_and_snapshotters(
    isolation: str, imgci_factory: Callable[[], Imgci], debian_tar: Path, tmp_path: Path
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(textwrap.dedent(MODES_DOCKERFILE).lstrip())
    digests = {}
    for backend in ("overlay", "native"):
        cli = imgci_factory()
        cli.env["SOURCE_DATE_EPOCH"] = "1700000000"
        cli.run(
            "import",
            str(debian_tar),
            "localhost/debian:bookworm",
            *[a for c in DEBIAN_CHANGES for a in ("--change", c)],
        )
        iid = tmp_path / f"iid-{backend}"
        cli.run("build", "--isolation", isolation, "-b", backend, "--iidfile", str(iid), "-t", "modes:1", str(ctx))
        digests[backend] = iid.read_text()
        archive = tmp_path / f"{backend}.tar"
        cli.run("save", "modes:1", "-o", str(archive))
        layers = _layers(archive)
        run1, run2 = layers[1], layers[2]
        assert "usr/share/.wh.doc" in run1 and "etc/.wh.motd" in run1 and "var/cache/.wh.apt" in run1
        f = run1["srv/app/f"]
        assert (f.uid, f.gid, f.mode) == (1500, 1500, 0o4750)
        assert run1["srv/app/hard"].islnk() and run1["srv/app/hard"].linkname == "srv/app/f"
        assert run1["srv/link"].issym() and run1["srv/link"].linkname == "/srv/app/f"
        # a re-created directory hides every lower entry: a whiteout for each (native) or an opaque marker (overlay)
        conf = {n for n in run1 if n.startswith("etc/apt/apt.conf.d/")}
        lower = _base_children(debian_tar, "etc/apt/apt.conf.d")
        assert lower and "etc/apt/apt.conf.d/n" in conf
        assert "etc/apt/apt.conf.d/.wh..wh..opq" in conf or {f"etc/apt/apt.conf.d/.wh.{c}" for c in lower} <= conf
        dv = run2["etc/debian_version"]
        assert (dv.uid, dv.mode) == (1500, 0o640)  # chown/chmod only: the file is in the layer with its content
        assert dv.size > 0
        assert sorted(run2) == ["etc", "etc/debian_version"]
    assert digests["overlay"] == digests["native"], digests


def _base_children(debian_tar: Path, directory: str) -> set[str]:
    with tarfile.open(debian_tar) as t:
        names = {m.name.removeprefix("./").rstrip("/") for m in t.getmembers()}
    return {n.rpartition("/")[2] for n in names if n.rpartition("/")[0] == directory}
