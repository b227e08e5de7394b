"""The image commands as a real unprivileged user (created by the test when run as root) on its own state dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.infra.registry import RegistryServer
from tests.integration.rootless import RootlessUser


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> RootlessUser:
    return RootlessUser.create(tmp_path_factory.mktemp("rootless"))


def _import_busybox(user: RootlessUser, home: Path, busybox_tar: Path, state: Path) -> None:
    """``localhost/busybox:latest`` in ``state``, imported by the user from a copy of the tar it can read."""
    tar = home / "busybox.tar"
    shutil.copy(busybox_tar, tar)
    os.chmod(tar, 0o644)
    user.imgci("import", str(tar), "localhost/busybox:latest", state=state)


def _layer_members(oci_tar: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry of the image's layers above the base in an OCI archive: name -> (uid, gid, file data)."""
    import tarfile

    members: dict[str, tuple[int, int, bytes]] = {}
    with tarfile.open(oci_tar) as oci:
        index = json.load(oci.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(oci.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))  # type: ignore[arg-type]
        for layer in manifest["layers"][1:]:
            blob = oci.extractfile("blobs/sha256/" + layer["digest"][7:])
            with tarfile.open(fileobj=blob, mode="r:gz") as lt:
                for m in lt.getmembers():
                    data = lt.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
                    members[m.name.rstrip("/")] = (m.uid, m.gid, data)
    return members


def test_unprivileged_user_pull_push_save_unpack(
    user: RootlessUser, registry: RegistryServer, busybox_tar: Path
) -> None:
    home = user.private_dir()
    try:
        tar = home / "busybox.tar"
        shutil.copy(busybox_tar, tar)
        os.chmod(tar, 0o644)
        assert user.run(["id", "-u"]).stdout.decode().strip() == str(user.uid)
        if os.geteuid() == 0:
            assert user.uid != 0

        state = home / "state"
        (home / "docker").mkdir()
        if os.geteuid() == 0:
            os.chown(home / "docker", user.uid, user.gid)
        name = f"{registry.host}/rootless/busybox:1"
        user.imgci("import", str(tar), name, "--change", 'CMD=["sh"]', state=state)
        pushed = user.imgci("push", name, state=state)
        assert "Successfully pushed" in pushed

        state2 = home / "state2"
        pulled = user.imgci("pull", name, state=state2)
        assert "Digest: sha256:" in pulled
        listing = json.loads(user.imgci("ls", "--format", "json", state=state2))
        assert [i["name"] for i in listing] == [name]

        archive = home / "busybox.tar.out"
        user.imgci("save", name, "-o", str(archive), state=state2)
        assert archive.stat().st_uid == user.uid and archive.stat().st_size > 500_000

        rootfs = home / "rootfs"
        user.imgci("unpack", name, "-o", str(rootfs), state=state2)
        assert (rootfs / "bin" / "busybox").stat().st_uid == user.uid  # unprivileged: files belong to the user
        out = user.run([str(rootfs / "bin" / "sh"), "-c", "echo rootless ok"]).stdout.decode()
        assert out.strip() == "rootless ok"

        # everything in the state dirs belongs to the user: nothing needed root
        for p in [*state.rglob("*"), *state2.rglob("*")]:
            assert p.lstat().st_uid == user.uid, p
        assert "ok:" in user.imgci("fsck", state=state2)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_unprivileged_user_builds_with_chown(user: RootlessUser, busybox_tar: Path) -> None:
    """Ownership in layers comes from the Dockerfile, not from the unprivileged user's files."""
    home = user.private_dir()
    try:
        ctx = home / "ctx"
        ctx.mkdir()
        (ctx / "f.txt").write_text("owned\n")
        (ctx / "Dockerfile").write_text(
            "FROM localhost/busybox:latest AS base\nCOPY --chown=nobody:nogroup f.txt /data/f.txt\n"
            "FROM base\nCOPY --from=base /data/f.txt /again.txt\nWORKDIR /work\n"
        )
        for p in (ctx, ctx / "f.txt", ctx / "Dockerfile"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        state = home / "state"
        _import_busybox(user, home, busybox_tar, state)
        user.imgci(
            "build", "-t", "rootless/app:1", "--output", f"type=oci,dest={home / 'oci.tar'}", str(ctx), state=state
        )
        owners = {name: (uid, gid) for name, (uid, gid, _) in _layer_members(home / "oci.tar").items()}
        assert owners["data/f.txt"] == (65534, 65534)
        assert owners["again.txt"] == (65534, 65534)  # COPY --from keeps the stage's owners
        assert owners["work"] == (0, 0)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_unprivileged_user_copies_a_large_context(user: RootlessUser, busybox_tar: Path) -> None:
    """A COPY of 1,200 files: its layer is unpacked into STATE/layers by a child process (imgci._unpack) running
    as the unprivileged user, and what a later step reads from it (COPY --from) comes from that layer."""
    home = user.private_dir()
    try:
        ctx = home / "ctx"
        for i in range(1200):
            f = ctx / "many" / f"d{i % 12}" / f"f{i}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"file {i}\n")
        (ctx / "Dockerfile").write_text(
            "FROM localhost/busybox:latest AS base\nCOPY --chown=nobody:nogroup many/ /many/\n"
            "FROM base\nCOPY --from=base /many/d7/f7.txt /again.txt\n"
        )
        for p in [ctx, *ctx.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        state = home / "state"
        _import_busybox(user, home, busybox_tar, state)
        user.imgci(
            "build", "-t", "rootless/many:1", "--output", f"type=oci,dest={home / 'oci.tar'}", str(ctx), state=state
        )
        members = _layer_members(home / "oci.tar")
        assert sum(1 for k in members if k.startswith("many/") and k.endswith(".txt")) == 1200
        assert members["many/d5/f5.txt"] == (65534, 65534, b"file 5\n")
        assert members["again.txt"] == (65534, 65534, b"file 7\n")
        indexes = [json.loads(p.read_text()) for p in (state / "layers").glob("*/index.json")]
        assert any(len(doc["entries"]) > 1200 for doc in indexes)  # the COPY layer, unpacked
        assert not list((state / "layers").glob(".tmp-*"))
        assert "ok:" in user.imgci("fsck", state=state)
    finally:
        shutil.rmtree(home, ignore_errors=True)
