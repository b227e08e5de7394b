"""pull_image / push_image against an in-memory registry client and a real Store."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from imgci.errors import BlobNotFoundError, DigestMismatchError, ImageNotFoundError, PlatformError, RegistryError
from imgci.oci import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    Descriptor,
    Digest,
    Index,
    Manifest,
    Platform,
    canonical_json,
)
from imgci.reference import Reference, parse
from imgci.registry.client import FetchedManifest, MountResult
from imgci.store import Store
from imgci.transfer import PrePush, TransferEvent, pull_image, push_image

REG = "reg.test:5000"


class MemoryRegistry:
    """The subset of RegistryClient that transfer uses, over dicts. ``corrupt`` digests are served altered."""

    def __init__(self) -> None:
        self.blobs: dict[str, dict[Digest, bytes]] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.corrupt: set[Digest] = set()
        self.calls: list[tuple[str, ...]] = []
        self.lock = threading.Lock()
        self.deny_mount_from: set[str] = set()

    def _log(self, *call: str) -> None:
        with self.lock:
            self.calls.append(call)

    def repo_blobs(self, repo: str) -> dict[Digest, bytes]:
        return self.blobs.setdefault(repo, {})

    def get_manifest(self, ref: Reference) -> FetchedManifest:
        self._log("get_manifest", ref.repository, ref.identifier)
        raw, mt = self.manifests[ref.repository][ref.identifier]
        return FetchedManifest(raw, mt, Digest.of(raw))

    def head_manifest(self, ref: Reference, *, push: bool = False) -> Descriptor | None:
        self._log("head_manifest", ref.repository, ref.identifier)
        found = self.manifests.get(ref.repository, {}).get(ref.identifier)
        return None if found is None else Descriptor(found[1], Digest.of(found[0]), len(found[0]))

    def put_manifest(self, repo: str, tag_or_digest: str, raw: bytes, media_type: str) -> Digest:
        self._log("put_manifest", repo, tag_or_digest)
        d = Digest.of(raw)
        m = self.manifests.setdefault(repo, {})
        m[tag_or_digest] = m[d.value] = (raw, media_type)
        return d

    # What a RegistryClient remembers having put into a repository: nothing here, each push asks the registry as a
    # fresh imgci process does (tests/integration/test_registry_transfer.py has the real client's memory).
    def placed(self, repo: str, digest: Digest) -> bool:
        return False

    def note_placed(self, repo: str, digest: Digest) -> None:
        pass

    def blob_exists(self, repo: str, digest: Digest, *, push: bool = False) -> int | None:
        self._log("blob_exists", repo, digest.value)
        data = self.repo_blobs(repo).get(digest)
        return None if data is None else len(data)

    def fetch_blob(self, repo: str, desc: Descriptor, writer: Any, *, progress: Any = None) -> int:
        self._log("fetch_blob", repo, desc.digest.value)
        data = self.repo_blobs(repo)[desc.digest]
        if desc.digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        writer.write(data)
        if progress:
            progress(len(data))
        return len(data)

    def mount_blob(self, repo: str, digest: Digest, from_repo: str) -> MountResult:
        self._log("mount_blob", repo, digest.value, from_repo)
        if from_repo in self.deny_mount_from:
            raise RegistryError("denied", status=401)
        data = self.repo_blobs(from_repo).get(digest)
        if data is None:
            return MountResult(False, "http://reg/upload/1")
        self.repo_blobs(repo)[digest] = data
        return MountResult(True)

    def upload_blob(
        self,
        repo: str,
        desc: Descriptor,
        open_fn: Callable[[], IO[bytes]],
        *,
        progress: Any = None,
        location: Any = None,
    ) -> int:
        self._log("upload_blob", repo, desc.digest.value)
        with open_fn() as f:
            data = f.read()
        desc.digest.verify(data)
        self.repo_blobs(repo)[desc.digest] = data
        return len(data)


def make_image(store: Store, name: str, layers: list[bytes], arch: str = "amd64") -> Manifest:
    ldescs = [Descriptor(OCI_LAYER_GZIP, store.write_blob(data).digest, len(data)) for data in layers]
    cfg = canonical_json({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    cd = store.write_blob(cfg)
    m = Manifest.build(Descriptor(OCI_CONFIG, cd.digest, len(cfg)), ldescs)
    store.write_blob(m.raw)
    store.set_ref(name, m.descriptor())
    return m


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


@pytest.fixture
def other(tmp_path: Path) -> Store:
    return Store(tmp_path / "other")


def test_push_then_pull_round_trip(store: Store, other: Store) -> None:
    reg = MemoryRegistry()
    m = make_image(store, "localhost/app:1", [b"layer-one", b"layer-two"])
    events: list[TransferEvent] = []
    dest = parse(f"{REG}/team/app:v1")
    result = push_image(store, "localhost/app:1", dest, client_factory=lambda r: reg, progress=events.append)
    assert result.digest == m.digest
    assert (result.uploaded_blobs, result.skipped_blobs, result.mounted_blobs) == (3, 0, 0)
    assert result.uploaded_bytes == m.config.size + sum(x.size for x in m.layers)
    assert reg.calls[-1] == ("put_manifest", "team/app", "v1")  # manifest last
    assert {e.action for e in events} >= {"uploading", "uploaded", "done"}

    pulled = pull_image(other, dest, platform=Platform.parse("linux/amd64"), client_factory=lambda r: reg)
    assert pulled.name == f"{REG}/team/app:v1"
    assert pulled.digest == m.digest and pulled.downloaded_blobs == 3
    assert other.get_ref(pulled.name).digest == m.digest
    assert other.read_blob(m.layers[1].digest) == b"layer-two"
    assert other.fsck() == []


def test_repush_uploads_nothing(store: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"a"])
    dest = parse(f"{REG}/team/app:v1")
    push_image(store, "localhost/app:1", dest, client_factory=lambda r: reg)
    again = push_image(store, "localhost/app:1", dest, client_factory=lambda r: reg)
    assert (again.uploaded_blobs, again.skipped_blobs) == (0, 2)


def test_mount_from_hint_and_from_local_refs(store: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"shared-layer"])
    push_image(store, "localhost/app:1", parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    hinted = push_image(
        store, "localhost/app:1", parse(f"{REG}/team/a:1"), client_factory=lambda r: reg, mount_from=[f"{REG}/base/img"]
    )
    assert hinted.mounted_blobs == 2 and hinted.uploaded_blobs == 0
    # a ref pulled from the same registry is a mount source without any hint
    pull_image(store, parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    auto = push_image(store, "localhost/app:1", parse(f"{REG}/team/b:1"), client_factory=lambda r: reg)
    assert auto.mounted_blobs == 2
    assert ("mount_blob", "team/b", store.get_ref("localhost/app:1").digest.value, "base/img") not in reg.calls


def test_a_blob_with_a_known_source_is_mounted_without_asking_first(store: Store) -> None:
    """One request per blob (the mount) where a local ref says which repository holds it; a hint, which may not
    hold it, is still tried only after the destination was asked."""
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"shared-layer"])
    push_image(store, "localhost/app:1", parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    pull_image(store, parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    reg.calls.clear()
    result = push_image(store, "localhost/app:1", parse(f"{REG}/team/b:1"), client_factory=lambda r: reg)
    assert (result.mounted_blobs, result.uploaded_blobs, result.skipped_blobs) == (2, 0, 0)
    assert sorted(c[0] for c in reg.calls) == ["head_manifest", "mount_blob", "mount_blob", "put_manifest"]
    reg.calls.clear()
    hinted = push_image(
        store, "localhost/app:1", parse(f"{REG}/team/c:1"), client_factory=lambda r: reg, mount_from=[f"{REG}/x/y"]
    )
    assert hinted.mounted_blobs == 2
    assert [c[0] for c in reg.calls].count("blob_exists") == 0  # base/img is known: x/y is never needed


def test_a_declined_mount_of_a_blob_the_destination_has_uploads_nothing(store: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"layer"])
    push_image(store, "localhost/app:1", parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    push_image(store, "localhost/app:1", parse(f"{REG}/team/d:1"), client_factory=lambda r: reg)
    pull_image(store, parse(f"{REG}/base/img:1"), client_factory=lambda r: reg)
    reg.blobs["base/img"].clear()  # the source lost them (garbage-collected): the mounts are declined
    reg.calls.clear()
    result = push_image(store, "localhost/app:1", parse(f"{REG}/team/d:2"), client_factory=lambda r: reg)
    assert (result.uploaded_blobs, result.skipped_blobs, result.mounted_blobs) == (0, 2, 0)
    assert sorted(c[0] for c in reg.calls if c[0] != "head_manifest") == [
        *["blob_exists"] * 2,
        *["mount_blob"] * 2,
        "put_manifest",
    ]


def test_blobs_pushed_ahead_are_not_asked_for_again(store: Store) -> None:
    """`build --push` hands each layer to a PrePush while the build runs; the final push waits for them and
    only does the rest (the config, the manifest)."""
    reg = MemoryRegistry()
    m = make_image(store, "localhost/app:1", [b"layer-one", b"layer-two"])
    dest = parse(f"{REG}/team/app:v1")
    ahead = PrePush(store, dest, client_factory=lambda r: reg)
    for layer in m.layers:
        ahead.add(layer)
    ahead.add(m.layers[0])  # twice: once
    result = push_image(store, "localhost/app:1", dest, client_factory=lambda r: reg, prepush=ahead)
    assert (result.uploaded_blobs, result.skipped_blobs, result.mounted_blobs) == (3, 0, 0)
    assert result.uploaded_bytes == m.config.size + sum(x.size for x in m.layers)
    uploads = [c[2] for c in reg.calls if c[0] == "upload_blob"]
    assert sorted(uploads) == sorted(d.digest.value for d in (m.config, *m.layers))  # each once
    heads = [c[2] for c in reg.calls if c[0] == "blob_exists"]
    assert sorted(heads) == sorted(uploads)  # one HEAD each: none again at the end
    assert reg.calls[-1] == ("put_manifest", "team/app", "v1")
    assert reg.repo_blobs("team/app")[m.layers[1].digest] == b"layer-two"


def test_a_blob_pushed_ahead_that_failed_fails_the_push(store: Store) -> None:
    reg = MemoryRegistry()
    m = make_image(store, "localhost/app:1", [b"layer"])
    dest = parse(f"{REG}/team/app:v1")
    ahead = PrePush(store, dest, client_factory=lambda r: reg)
    missing = Descriptor(OCI_LAYER_GZIP, Digest.of(b"not in the store"), 16)
    ahead.add(missing)
    with pytest.raises(BlobNotFoundError):
        push_image(store, "localhost/app:1", dest, client_factory=lambda r: reg, prepush=ahead)
    assert not any(c[0] == "put_manifest" for c in reg.calls)  # no manifest names an image with a missing blob
    assert m.layers[0].digest in reg.repo_blobs("team/app")  # the others went in the same parallel pass


def test_refused_mount_falls_back_to_upload(store: Store) -> None:
    reg = MemoryRegistry()
    reg.deny_mount_from = {"secret/base"}
    make_image(store, "localhost/app:1", [b"x"])
    result = push_image(
        store,
        "localhost/app:1",
        parse(f"{REG}/team/a:1"),
        client_factory=lambda r: reg,
        mount_from=[f"{REG}/secret/base"],
    )
    assert result.uploaded_blobs == 2 and result.mounted_blobs == 0


def test_pull_skips_blobs_the_store_has(store: Store, other: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"common", b"new"])
    push_image(store, "localhost/app:1", parse(f"{REG}/team/app:1"), client_factory=lambda r: reg)
    other.write_blob(b"common")
    result = pull_image(other, parse(f"{REG}/team/app:1"), client_factory=lambda r: reg)
    assert (result.downloaded_blobs, result.skipped_blobs) == (2, 1)


def test_corrupt_blob_leaves_no_ref_and_no_blob(store: Store, other: Store) -> None:
    reg = MemoryRegistry()
    m = make_image(store, "localhost/app:1", [b"good", b"evil"])
    push_image(store, "localhost/app:1", parse(f"{REG}/team/app:1"), client_factory=lambda r: reg)
    reg.corrupt.add(m.layers[1].digest)
    with pytest.raises(DigestMismatchError):
        pull_image(other, parse(f"{REG}/team/app:1"), client_factory=lambda r: reg)
    assert not other.has_blob(m.layers[1].digest)
    assert not other.has_blob(m.digest)
    assert other.list_refs() == []
    assert list(other.ingest_dir.iterdir()) == []


def _multi_arch(store: Store, reg: MemoryRegistry) -> tuple[Index, dict[str, Manifest]]:
    mans = {
        "amd64": make_image(store, "localhost/m:amd64", [b"amd64-layer"], "amd64"),
        "arm64": make_image(store, "localhost/m:arm64", [b"arm64-layer"], "arm64"),
    }
    attestation = Descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        mans["amd64"].digest,
        len(mans["amd64"].raw),
        Platform("unknown", "unknown"),
        {"vnd.docker.reference.type": "attestation-manifest"},
    )
    index = Index.build(
        [
            mans["amd64"].descriptor(Platform("linux", "amd64")),
            mans["arm64"].descriptor(Platform("linux", "arm64")),
            attestation,
        ]
    )
    store.write_blob(index.raw)
    store.set_ref("localhost/m:multi", Descriptor(index.media_type, index.digest, len(index.raw)))
    return index, mans


def test_multi_arch_push_children_first_then_pull_selects_platform(store: Store, other: Store) -> None:
    reg = MemoryRegistry()
    index, mans = _multi_arch(store, reg)
    result = push_image(store, "localhost/m:multi", parse(f"{REG}/team/multi:1"), client_factory=lambda r: reg)
    assert result.digest == index.digest
    puts = [c for c in reg.calls if c[0] == "put_manifest"]
    assert puts[-1] == ("put_manifest", "team/multi", "1")
    assert {p[2] for p in puts[:-1]} == {mans["amd64"].digest.value, mans["arm64"].digest.value}

    pulled = pull_image(
        other, parse(f"{REG}/team/multi:1"), platform=Platform.parse("linux/arm64"), client_factory=lambda r: reg
    )
    assert pulled.digest == index.digest
    assert pulled.manifest.digest == mans["arm64"].digest
    assert pulled.platform == Platform("linux", "arm64")
    assert other.get_ref(pulled.name).digest == mans["arm64"].digest
    assert other.has_blob(index.digest)  # kept so a digest-pinned ref stays resolvable
    assert not other.has_blob(mans["amd64"].layers[0].digest)

    by_digest = pull_image(
        other,
        Reference(REG, "team/multi", None, index.digest),
        platform=Platform.parse("linux/amd64"),
        client_factory=lambda r: reg,
    )
    assert by_digest.name == f"{REG}/team/multi@{index.digest}"
    assert other.get_ref(by_digest.name).digest == mans["amd64"].digest

    with pytest.raises(PlatformError, match="linux/amd64, linux/arm64"):
        pull_image(
            other, parse(f"{REG}/team/multi:1"), platform=Platform.parse("linux/s390x"), client_factory=lambda r: reg
        )


def test_push_index_with_missing_child_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    reg = MemoryRegistry()
    _index, mans = _multi_arch(store, reg)
    store.blob_path(mans["arm64"].digest).unlink()  # as after pulling only one platform of an index
    with pytest.raises(BlobNotFoundError, match="linux/arm64"):
        push_image(store, "localhost/m:multi", parse(f"{REG}/x/y:1"), client_factory=lambda r: reg)


def test_push_unknown_local_image(store: Store) -> None:
    with pytest.raises(ImageNotFoundError):
        push_image(store, "localhost/nope:1", parse(f"{REG}/x/y:1"), client_factory=lambda r: MemoryRegistry())


def test_first_failure_stops_the_transfer(store: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"l1", b"l2", b"l3", b"l4", b"l5", b"l6"])

    def boom(*a: Any, **k: Any) -> int:
        raise RegistryError("upload exploded", temporary=False)

    reg.upload_blob = boom  # type: ignore[method-assign]
    with pytest.raises(RegistryError, match="upload exploded"):
        push_image(store, "localhost/app:1", parse(f"{REG}/x/y:1"), client_factory=lambda r: reg)
    assert not any(c[0] == "put_manifest" for c in reg.calls)


def test_events_are_json_friendly(store: Store) -> None:
    reg = MemoryRegistry()
    make_image(store, "localhost/app:1", [b"a"])
    events: list[TransferEvent] = []
    push_image(store, "localhost/app:1", parse(f"{REG}/x/y:1"), client_factory=lambda r: reg, progress=events.append)
    import dataclasses

    for e in events:
        json.dumps(dataclasses.asdict(e))
        assert e.message and e.key
