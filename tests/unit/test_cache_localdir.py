"""The local-directory cache backend without a build: hand-made records and blobs in a temp Store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgci.cache.backends import fetcher, make_exporter, make_importer, parse_cache_from, parse_cache_to
from imgci.cache.backends.artifact import CACHE_ARTIFACT_TYPE, RECORDS_MEDIA_TYPE
from imgci.cache.backends.localdir import LocalDirExporter, LocalDirImporter
from imgci.cache.manager import BuildCache
from imgci.cache.records import CacheRecord
from imgci.errors import DigestMismatchError, ImgciError
from imgci.oci import OCI_LAYER_GZIP, Descriptor, Digest
from imgci.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def record(store: Store, key: str, *blobs: bytes, created: float = 1000.0) -> CacheRecord:
    layers = []
    for data in blobs:
        store.write_blob(data)
        layers.append((Descriptor(OCI_LAYER_GZIP, Digest.of(data), len(data)), Digest.of(b"diff " + data)))
    return CacheRecord(
        key=key,
        parent=f"parent-of-{key}",
        instruction=f"RUN make {key}",
        inputs={"arg": key},
        config={"Env": [f"K={key}"]},
        layers=layers,
        history=[{"created_by": f"RUN make {key}"}],
        duration=1.5,
        created=created,
    )


def no_fetch(descriptor: Descriptor) -> None:
    raise ImgciError(f"no cache holds {descriptor.digest.short}")


def export(dest: Path, store: Store, records: list[CacheRecord], **kw: object) -> object:
    exporter = LocalDirExporter(dest, **kw)  # type: ignore[arg-type]
    return exporter.export(records, store, no_fetch)


def check_layout(root: Path) -> dict[str, CacheRecord]:
    """Every blob index.json reaches exists and verifies, nothing else is in blobs/, no temp files; the records."""
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "imgci-cache"]
    assert entry["artifactType"] == CACHE_ARTIFACT_TYPE

    def blob(desc: dict) -> bytes:
        data = (root / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        assert len(data) == desc["size"] and Digest.of(data).value == desc["digest"]
        return data

    manifest = json.loads(blob(entry))
    assert manifest["artifactType"] == CACHE_ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == RECORDS_MEDIA_TYPE
    doc = json.loads(blob(manifest["config"]))
    assert doc["version"] == 1
    for layer in manifest["layers"]:
        blob(layer)
    records = {r["key"]: CacheRecord.loads(json.dumps(r)) for r in doc["records"]}
    referenced = {d.digest.value for r in records.values() for d, _ in r.layers}
    assert referenced == {x["digest"] for x in manifest["layers"]} or (not referenced and manifest["layers"])
    reachable = {entry["digest"], manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])}
    present = {"sha256:" + p.name for p in (root / "blobs" / "sha256").iterdir()}
    assert present == reachable
    assert not list(root.glob(".tmp-*"))
    return records


def test_round_trip_through_a_directory(store: Store, tmp_path: Path) -> None:
    shared = b"shared layer" * 100
    records = [record(store, "a", b"layer a", shared), record(store, "b", shared), record(store, "c")]
    dest = tmp_path / "cache"
    exporter = make_exporter(parse_cache_to(f"type=local,dest={dest},mode=max"))
    assert exporter is not None
    result = exporter.export(records, store, no_fetch)
    assert (result.records, result.blobs, result.uploaded, result.existing) == (3, 2, 2, 0)
    assert {k: r.dumps() for k, r in check_layout(dest).items()} == {r.key: r.dumps() for r in records}

    fresh = Store(tmp_path / "state2")
    notes: list[str] = []
    importer = make_importer(parse_cache_from(f"type=local,src={dest}"), on_note=notes.append)
    assert importer.describe() == f"local:{dest}"
    for r in records:
        got = importer.lookup(r.key)
        assert got is not None and got.dumps() == r.dumps()
    assert importer.lookup("nope") is None
    assert notes == []
    descriptor = records[0].layers[0][0]
    assert not fresh.has_blob(descriptor.digest)
    importer.fetch_blob(descriptor, fresh)
    assert fresh.read_blob(descriptor.digest) == b"layer a"

    again = export(dest, store, records)  # nothing new: every blob is already there
    assert (again.uploaded, again.existing) == (0, 2)  # type: ignore[attr-defined]


def test_exports_merge_and_unused_blobs_go(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    export(dest, store, [record(store, "a", b"A"), record(store, "b", b"B")])
    first_manifest = json.loads((dest / "index.json").read_text())["manifests"][0]["digest"]
    newer_b = record(store, "b", b"B2", created=2000.0)
    export(dest, store, [newer_b, record(store, "c", b"C")])
    records = check_layout(dest)  # also: the old manifest, old records blob and blob "B" were removed
    assert sorted(records) == ["a", "b", "c"]
    assert records["b"].dumps() == newer_b.dumps()
    assert not (dest / "blobs" / "sha256" / first_manifest.split(":")[1]).exists()
    assert not (dest / "blobs" / "sha256" / Digest.of(b"B").hex).exists()


def test_other_index_entries_and_their_blobs_are_kept(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    export(dest, store, [record(store, "a", b"A")])
    other = b'{"hello": "world"}'
    (dest / "blobs" / "sha256" / Digest.of(other).hex).write_bytes(other)
    index = json.loads((dest / "index.json").read_text())
    index["manifests"].insert(0, {"mediaType": "application/json", "digest": Digest.of(other).value, "size": 18})
    (dest / "index.json").write_text(json.dumps(index))
    export(dest, store, [record(store, "b", b"B")])
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"][0]["mediaType"] == "application/json"
    assert (dest / "blobs" / "sha256" / Digest.of(other).hex).read_bytes() == other


def test_max_size_evicts_least_recently_used_records_and_their_blobs(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    shared = os.urandom(1000)
    export(dest, store, [record(store, "old", os.urandom(3000), shared)])
    export(dest, store, [record(store, "mid", os.urandom(3000), shared)])
    result = export(dest, store, [record(store, "new", os.urandom(3000))], max_size=8000)
    assert result.evicted == 1  # type: ignore[attr-defined]
    records = check_layout(dest)
    assert sorted(records) == ["mid", "new"]  # 3000 + 1000 + 3000 fits, the oldest went
    assert (dest / "blobs" / "sha256" / Digest.of(shared).hex).exists()  # still used by "mid"
    export(dest, store, [], max_size=3500)
    assert sorted(check_layout(dest)) == ["new"]


def test_a_partial_directory_is_a_warning_and_misses(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    records = [record(store, k, f"layer {k}".encode() * 50) for k in ("ok", "missing", "truncated", "corrupt")]
    export(dest, store, records)
    blob = {r.key: dest / "blobs" / "sha256" / r.layers[0][0].digest.hex for r in records}
    blob["missing"].unlink()
    blob["truncated"].write_bytes(blob["truncated"].read_bytes()[:10])
    data = bytearray(blob["corrupt"].read_bytes())
    data[5] ^= 0xFF
    blob["corrupt"].write_bytes(bytes(data))

    notes: list[str] = []
    importer = LocalDirImporter(dest, on_note=notes.append)
    assert importer.lookup("ok") is not None
    assert importer.lookup("missing") is None and importer.lookup("truncated") is None
    assert len(notes) == 1 and "2 of 4 records have a missing or truncated blob" in notes[0]
    corrupt = importer.lookup("corrupt")  # its size is right: the digest is checked on fetch
    assert corrupt is not None
    fresh = Store(tmp_path / "state2")
    with pytest.raises(DigestMismatchError):
        importer.fetch_blob(corrupt.layers[0][0], fresh)
    assert not blob["corrupt"].exists()  # removed so that the next export writes it again
    assert not fresh.has_blob(corrupt.layers[0][0].digest)

    # The next export drops what is broken and writes what it has again.
    result = export(dest, store, [records[3]])
    assert result.uploaded == 1  # type: ignore[attr-defined]
    assert sorted(check_layout(dest)) == ["corrupt", "ok"]


@pytest.mark.parametrize("damage", ["index", "manifest", "records", "version"])
def test_corrupt_documents_raise_imgci_errors_and_are_replaced_on_export(
    store: Store, tmp_path: Path, damage: str
) -> None:
    dest = tmp_path / "cache"
    export(dest, store, [record(store, "a", b"A")])
    index = json.loads((dest / "index.json").read_text())
    manifest_path = dest / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    records_digest = json.loads(manifest_path.read_text())["config"]["digest"]
    records_path = dest / "blobs" / "sha256" / records_digest.split(":")[1]
    if damage == "index":
        (dest / "index.json").write_text("{not json")
    elif damage == "manifest":
        manifest_path.write_bytes(manifest_path.read_bytes().replace(b"imgci", b"IMGCI"))
    elif damage == "records":
        records_path.write_bytes(b"x" * records_path.stat().st_size)
    else:  # a newer imgci's document, consistently re-digested
        doc = json.loads(records_path.read_text())
        doc["version"] = 2
        raw = json.dumps(doc).encode()
        (dest / "blobs" / "sha256" / Digest.of(raw).hex).write_bytes(raw)
        m = json.loads(manifest_path.read_text())
        m["config"].update(digest=Digest.of(raw).value, size=len(raw))
        mraw = json.dumps(m).encode()
        (dest / "blobs" / "sha256" / Digest.of(mraw).hex).write_bytes(mraw)
        index["manifests"][0].update(digest=Digest.of(mraw).value, size=len(mraw))
        (dest / "index.json").write_text(json.dumps(index))
    importer = LocalDirImporter(dest)
    with pytest.raises(ImgciError) as e:
        importer.lookup("a")
    assert str(dest) in e.value.message
    with pytest.raises(ImgciError):  # the same error on every later lookup
        importer.lookup("b")

    notes: list[str] = []
    LocalDirExporter(dest, on_note=notes.append).export([record(store, "b", b"B")], store, no_fetch)
    assert notes and notes[0].startswith("warning: cache local:")
    assert sorted(check_layout(dest)) == ["b"]


def test_no_directory_or_no_cache_yet_is_a_note_and_a_miss(tmp_path: Path) -> None:
    notes: list[str] = []
    assert LocalDirImporter(tmp_path / "absent", on_note=notes.append).lookup("k") is None
    (tmp_path / "empty").mkdir()
    assert LocalDirImporter(tmp_path / "empty", on_note=notes.append).lookup("k") is None
    assert len(notes) == 2 and all("building without it" in n for n in notes)


def test_blobs_left_remote_are_fetched_or_the_record_is_left_out(store: Store, tmp_path: Path) -> None:
    elsewhere = Store(tmp_path / "elsewhere")
    remote = record(elsewhere, "remote", b"only elsewhere")
    unavailable = record(elsewhere, "gone", b"nowhere")
    local = record(store, "local", b"here")
    fetched: list[str] = []

    def fetch(descriptor: Descriptor) -> None:
        if descriptor.digest == remote.layers[0][0].digest:
            fetched.append(descriptor.digest.short)
            store.write_blob(elsewhere.read_blob(descriptor.digest))
        else:
            raise ImgciError("unreachable")

    notes: list[str] = []
    result = LocalDirExporter(tmp_path / "cache", on_note=notes.append).export(
        [remote, unavailable, local], store, fetch
    )
    assert fetched == [remote.layers[0][0].digest.short]
    assert result.dropped == ["RUN make gone"] and "unreachable" in notes[0]
    assert sorted(check_layout(tmp_path / "cache")) == ["local", "remote"]


def test_fetcher_asks_the_build_cache_for_blobs_its_importers_left_remote(store: Store, tmp_path: Path) -> None:
    source = Store(tmp_path / "source")
    r = record(source, "k", b"remote layer")
    export(tmp_path / "cache", source, [r])
    cache = BuildCache(store, importers=[LocalDirImporter(tmp_path / "cache")])
    assert cache.lookup("k", stage="s", name="step") is not None
    assert not store.has_blob(r.layers[0][0].digest)  # a hit stays remote...
    fetcher(cache)(r.layers[0][0])  # ...until an exporter needs it
    assert store.read_blob(r.layers[0][0].digest) == b"remote layer"
