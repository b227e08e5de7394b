"""archive: import_rootfs (deterministic, normalised), docker-archive and OCI-layout save, and load round trips."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest

from imgci.archive import import_rootfs, load_archive, save_docker_archive, save_oci_layout
from imgci.compression import open_decompressed
from imgci.errors import CorruptArchiveError, DigestMismatchError, UnsafeArchiveError, UsageError
from imgci.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
)
from imgci.store import Store
from tests.infra import rootfs as tb

AMD64 = Platform("linux", "amd64")
ROOTFS = [
    tb.directory("./"),
    tb.directory("./etc"),
    tb.file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    tb.file("/etc/hostname", b"box\n"),  # absolute: normalised to etc/hostname
    tb.directory("bin"),
    tb.file("bin/sh", b"#!fake\n", 0o755),
    tb.hardlink("bin/ash", "./bin/sh"),
    tb.symlink("bin/busybox", "/bin/sh"),
]


class Pipe:
    """A write-only, non-seekable sink (what stdout is)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


@pytest.fixture
def epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def _import(store: Store, entries: list[tb.TarEntry] = ROOTFS, **kw: object) -> Manifest:
    desc = import_rootfs(store, io.BytesIO(tb.build_tar(entries)), platform=AMD64, **kw)  # type: ignore[arg-type]
    manifest = store.read_manifest(desc.digest)
    assert isinstance(manifest, Manifest)
    return manifest


def _layer_names(store: Store, manifest: Manifest) -> list[str]:
    with store.open_blob(manifest.layers[0].digest) as f, tarfile.open(fileobj=open_decompressed(f), mode="r|") as t:
        return [m.name for m in t]


# -- import_rootfs ------------------------------------------------------------------------------------------------
def test_import_is_deterministic_under_source_date_epoch(store: Store, tmp_path: Path, epoch: None) -> None:
    raw = tb.build_tar(ROOTFS)
    first = import_rootfs(store, io.BytesIO(raw), platform=AMD64)
    second = import_rootfs(store, io.BytesIO(raw), platform=AMD64)
    (tmp_path / "rootfs.tar.xz").write_bytes(lzma.compress(raw))
    from_file = import_rootfs(store, tmp_path / "rootfs.tar.xz", platform=AMD64)  # compression is detected
    assert first.digest == second.digest == from_file.digest
    config = store.read_config(Manifest.parse(store.read_blob(first.digest)).config.digest)
    assert config.created == "2023-11-14T22:13:20Z"


def test_import_config_and_layer(store: Store, epoch: None) -> None:
    manifest = _import(
        store,
        changes={
            "CMD": '["sh", "-c", "echo hi"]',
            "ENTRYPOINT": "/bin/run --flag",
            "Env": ["LANG=C.UTF-8"],
            "env": {"PATH": "/custom"},
            "WORKDIR": "/srv",
            "USER": "nobody",
            "LABEL": "org.example=1",
            "EXPOSE": "80/tcp 443/tcp",
        },
        comment="Imported from rootfs.tar",
    )
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.layers[0].media_type == OCI_LAYER_GZIP
    config = store.read_config(manifest.config.digest)
    doc = config.doc
    assert (doc["os"], doc["architecture"]) == ("linux", "amd64") and "variant" not in doc
    assert doc["config"] == {
        "Cmd": ["sh", "-c", "echo hi"],
        "Entrypoint": ["/bin/sh", "-c", "/bin/run --flag"],
        "Env": ["PATH=/custom", "LANG=C.UTF-8"],
        "WorkingDir": "/srv",
        "User": "nobody",
        "Labels": {"org.example": "1"},
        "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
    }
    assert doc["history"] == [
        {"created": "2023-11-14T22:13:20Z", "created_by": "imgci import", "comment": "Imported from rootfs.tar"}
    ]
    with store.open_blob(manifest.layers[0].digest) as f:
        assert config.diff_ids == [Digest.of(open_decompressed(f).read())]
    assert _layer_names(store, manifest) == [
        ".", "etc", "etc/passwd", "etc/hostname", "bin", "bin/sh", "bin/ash", "bin/busybox"
    ]  # fmt: skip


def test_import_defaults_and_options(store: Store) -> None:
    manifest = _import(store, compression="zstd", created="2020-01-01T00:00:00Z")
    assert manifest.layers[0].media_type == OCI_LAYER_ZSTD
    config = store.read_config(manifest.config.digest)
    assert config.doc["config"] == {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    assert config.created == "2020-01-01T00:00:00Z"
    arm = import_rootfs(store, io.BytesIO(tb.build_tar(ROOTFS)), platform=Platform.parse("linux/arm/v7"))
    assert arm.platform == Platform("linux", "arm", "v7")
    cfg = store.read_config(Manifest.parse(store.read_blob(arm.digest)).config.digest).doc
    assert (cfg["architecture"], cfg["variant"]) == ("arm", "v7")


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([tb.file("../escape", b"x")], UnsafeArchiveError),
        ([tb.hardlink("h", "../../etc/passwd")], UnsafeArchiveError),
        ([tb.symlink(".", "/tmp")], UnsafeArchiveError),
        ([tb.file("big", b"abc", size=1 << 30)], CorruptArchiveError),
    ],
)
def test_import_rejects_unsafe_or_corrupt_archives(
    store: Store, entries: list[tb.TarEntry], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _import(store, entries)
    assert list(store.ingest_dir.iterdir()) == []  # the half-written layer was discarded


def test_import_rejects_bad_options(store: Store) -> None:
    with pytest.raises(UsageError, match="unsupported image change"):
        _import(store, changes={"ONBUILD": "x"})
    with pytest.raises(UsageError):
        _import(store, compression="bzip2")


# -- save / load --------------------------------------------------------------------------------------------------
def _two_images(store: Store) -> tuple[Manifest, Manifest]:
    base = _import(store)
    other = _import(store, [*ROOTFS, tb.file("etc/motd", b"hi\n")], changes={"Cmd": ["sh"]})
    return base, other


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: (t.extractfile(m).read() if m.isfile() else b"") for m in t}  # type: ignore[union-attr]


def test_docker_archive_matches_the_docker_save_format(store: Store, epoch: None) -> None:
    base, other = _two_images(store)
    out = Pipe()
    save_docker_archive(
        store, [("busybox", base.digest), ("localhost:5000/team/app:1", base.digest), (None, other.digest)], out
    )
    files = _members(bytes(out.data))
    manifest = json.loads(files["manifest.json"])
    base_cfg = ImageConfig.parse(store.read_blob(base.config.digest))
    assert manifest[0] == {
        "Config": f"{base.config.digest.hex}.json",
        "RepoTags": ["busybox:latest", "localhost:5000/team/app:1"],
        "Layers": [f"{d.hex}/layer.tar" for d in base_cfg.diff_ids],
    }
    assert manifest[1]["RepoTags"] is None
    top = base_cfg.diff_ids[-1].hex
    assert json.loads(files["repositories"]) == {"busybox": {"latest": top}, "localhost:5000/team/app": {"1": top}}
    for entry in manifest:
        config_bytes = files[entry["Config"]]
        assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == "sha256:" + entry["Config"][:-5]
        for path, diff_id in zip(entry["Layers"], ImageConfig.parse(config_bytes).diff_ids, strict=True):
            layer = files[path]
            assert Digest.of(layer) == diff_id  # uncompressed: what docker load checks
            assert layer[257:262] == b"ustar"


def test_docker_archive_round_trip_keeps_digests_and_names(store: Store, tmp_path: Path, epoch: None) -> None:
    base, other = _two_images(store)
    out = Pipe()
    save_docker_archive(store, [("docker.io/library/busybox:latest", base.digest), ("app:2", other.digest)], out)
    fresh = Store(tmp_path / "fresh")
    loaded = load_archive(fresh, io.BytesIO(gzip.compress(bytes(out.data))))  # `docker save | gzip` works too
    assert [(i.name, i.descriptor.digest) for i in loaded] == [
        ("docker.io/library/busybox:latest", base.digest),  # imgci's gzip is deterministic: same layer digests
        ("docker.io/library/app:2", other.digest),
    ]
    assert fresh.get_ref("docker.io/library/app:2").digest == other.digest
    assert str(loaded[0]) == "docker.io/library/busybox:latest"
    assert fresh.fsck() == []


def test_oci_layout_round_trip_keeps_every_digest(store: Store, tmp_path: Path) -> None:
    base, other = _two_images(store)
    out = Pipe()
    save_oci_layout(store, [("busybox:1", base.digest), ("ghcr.io/o/app:2", other.digest), (None, base.digest)], out)
    files = _members(bytes(out.data))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["mediaType"] == OCI_INDEX
    assert [m.get("annotations") for m in index["manifests"]] == [
        {"io.containerd.image.name": "docker.io/library/busybox:1", "org.opencontainers.image.ref.name": "1"},
        {"io.containerd.image.name": "ghcr.io/o/app:2", "org.opencontainers.image.ref.name": "2"},
    ]  # (None, base) adds nothing: base is already named
    for name, data in files.items():
        if name.startswith("blobs/sha256/") and name.count("/") == 2 and not name.endswith("/"):
            assert Digest.of(data).hex == name.rsplit("/", 1)[1]
    fresh = Store(tmp_path / "fresh")
    loaded = load_archive(fresh, io.BytesIO(bytes(out.data)))
    assert [(i.name, i.descriptor.digest) for i in loaded] == [
        ("docker.io/library/busybox:1", base.digest),
        ("ghcr.io/o/app:2", other.digest),
    ]
    assert fresh.get_ref("ghcr.io/o/app:2").digest == other.digest
    assert fresh.fsck() == []


def test_oci_layout_saves_an_index_with_its_children(store: Store, tmp_path: Path) -> None:
    base, other = _two_images(store)
    index = Index.build([base.descriptor(AMD64), other.descriptor(Platform("linux", "arm64"))])
    store.write_blob(index.raw)
    out = Pipe()
    save_oci_layout(store, [("multi:1", index.digest)], out)
    fresh = Store(tmp_path / "fresh")
    [image] = load_archive(fresh, io.BytesIO(bytes(out.data)))
    assert image.descriptor.digest == index.digest and image.descriptor.media_type == OCI_INDEX
    assert fresh.fsck() == []
    docker = Pipe()
    save_docker_archive(store, [("multi:1", index.digest)], docker, platform=Platform("linux", "arm64"))
    assert json.loads(_members(bytes(docker.data))["manifest.json"])[0]["Config"] == f"{other.config.digest.hex}.json"


def _docker_archive(entries: list[object]) -> io.BytesIO:
    return io.BytesIO(tb.build_tar(entries))  # type: ignore[arg-type]


def _config(diff_ids: list[Digest]) -> bytes:
    return json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": [
        d.value for d in diff_ids]}}).encode()  # fmt: skip


def test_load_docker_archives_from_other_writers(store: Store) -> None:
    """Old docker (symlinked duplicate layers, VERSION/json files) and go-containerregistry (gzip'ed layers)."""
    layer = tb.build_tar([tb.file("hello", b"world")])
    diff_id = Digest.of(layer)
    config = _config([diff_id, diff_id])
    cfg_name = f"{Digest.of(config).hex}.json"
    archive = _docker_archive(
        [
            tb.directory("aaa"),
            tb.file("aaa/VERSION", b"1.0"),
            tb.file("aaa/json", b"{}"),
            tb.file("aaa/layer.tar", layer),
            tb.directory("bbb"),
            tb.symlink("bbb/layer.tar", "../aaa/layer.tar"),
            tb.file("ccc.tar.gz", gzip.compress(layer, mtime=0)),
            tb.file(cfg_name, config),
            tb.file(
                "manifest.json",
                json.dumps(
                    [
                        {"Config": cfg_name, "RepoTags": ["old:1"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]},
                        {"Config": cfg_name, "RepoTags": None, "Layers": ["ccc.tar.gz", "ccc.tar.gz"]},
                    ]
                ).encode(),
            ),
        ]
    )
    first, second = load_archive(store, archive)
    assert first.name == "docker.io/library/old:1" and second.name is None
    for image in (first, second):
        manifest = store.read_manifest(image.descriptor.digest)
        assert isinstance(manifest, Manifest) and manifest.config.digest == Digest.of(config)
        assert all(layer.media_type == OCI_LAYER_GZIP for layer in manifest.layers)
    assert store.fsck() == []


def test_load_rejects_bad_archives(store: Store) -> None:
    layer = tb.build_tar([tb.file("hello", b"world")])
    config = _config([Digest.of(b"not the layer")])
    cfg_name = f"{Digest.of(config).hex}.json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]).encode()
    with pytest.raises(DigestMismatchError):
        load_archive(store, _docker_archive([tb.file("l/layer.tar", layer), tb.file(cfg_name, config),
                                             tb.file("manifest.json", manifest)]))  # fmt: skip
    with pytest.raises(CorruptArchiveError, match="lacks layer"):
        load_archive(store, _docker_archive([tb.file(cfg_name, config), tb.file("manifest.json", manifest)]))
    with pytest.raises(CorruptArchiveError, match="malformed"):
        load_archive(store, _docker_archive([tb.file("index.json", b'{"manifests": "nope"}')]))
    with pytest.raises(CorruptArchiveError, match="neither"):
        load_archive(store, _docker_archive([tb.file("random", b"x")]))
    blob = b"some blob"
    with pytest.raises(DigestMismatchError):
        load_archive(store, _docker_archive([tb.file(f"blobs/sha256/{Digest.of(b'other').hex}", blob)]))
    missing = Manifest.build(Descriptor(OCI_CONFIG, Digest.of(config), len(config)), [])
    index = Index.build([missing.descriptor()])
    with pytest.raises(CorruptArchiveError, match="lacks blob"):
        load_archive(store, _docker_archive([tb.file("index.json", index.raw)]))
    with pytest.raises(UnsafeArchiveError):
        load_archive(store, _docker_archive([tb.file("../evil", b"x")]))


def test_save_detects_a_corrupt_blob(store: Store) -> None:
    base = _import(store)
    path = store.blob_path(base.config.digest)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(DigestMismatchError):
        save_oci_layout(store, [("x:1", base.digest)], Pipe())
    with pytest.raises(DigestMismatchError):
        save_docker_archive(store, [("x:1", base.digest)], Pipe())
