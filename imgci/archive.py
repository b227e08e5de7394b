"""Image archives: ``docker save`` and OCI-layout tarballs, loading both back, and ``docker import``.

Contract:
- :func:`import_rootfs` (from :mod:`imgci.rootfs_import`) turns a rootfs tarball into a one-layer image.
- :func:`save_docker_archive` and :func:`save_oci_layout` write a tar stream to any writable (stdout included:
  they never seek) without holding an image in memory; every blob is verified against its digest as it is
  streamed. Archives are deterministic (mtime 0, uid/gid 0, fixed order).
- :func:`load_archive` reads either format (optionally compressed) from a stream into the store, tags the images
  it found with their normalised names as ``docker load`` does, and returns them. OCI layouts keep every digest;
  docker archives keep the config digest (image ID) and diff_ids, and their uncompressed layers are stored
  gzip'ed (with imgci's deterministic gzip, so an image imgci made comes back with its manifest digest).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from imgci import reference
from imgci.compression import CompressingWriter, HashingReader, LayerDigests, Readable, Sink, detect, open_decompressed
from imgci.errors import (
    ArchiveError,
    CorruptArchiveError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidReferenceError,
    RegistryProtocolError,
)
from imgci.oci import OCI_CONFIG, OCI_INDEX, Descriptor, Digest, ImageConfig, Index, Manifest, Platform
from imgci.rootfs_import import created_timestamp, import_rootfs, normalise_tar
from imgci.store import Store
from imgci.tarstream import LNK, SYM, TarReader, safe_parts

__all__ = [
    "LoadedImage",
    "created_timestamp",
    "import_rootfs",
    "load_archive",
    "normalise_tar",
    "save_docker_archive",
    "save_oci_layout",
]

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
_MAX_METADATA = 64 << 20
_BLOB_PATH = re.compile(r"^blobs/(sha256|sha512)/([a-f0-9]+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedImage:
    """An image found by :func:`load_archive`: its normalised name (None if untagged) and manifest/index."""

    name: str | None
    descriptor: Descriptor

    def __str__(self) -> str:
        return self.name or f"ID {self.descriptor.digest}"


# -- save ---------------------------------------------------------------------------------------------------------
class _TarOut:
    """A deterministic streaming tar writer (mtime 0, root-owned, 0644 files)."""

    def __init__(self, out: Sink) -> None:
        self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=cast(IO[bytes], out), mode="w|", format=tarfile.PAX_FORMAT
        )
        self.written: set[str] = set()

    def _info(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime = size, kind, 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info

    def add_dir(self, name: str) -> None:
        if name not in self.written:
            self.written.add(name)
            self.tar.addfile(self._info(name, 0, tarfile.DIRTYPE))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.written.add(name)
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def add_stream(self, name: str, size: int, stream: Readable) -> None:
        self.written.add(name)
        self.tar.addfile(self._info(name, size), cast(IO[bytes], stream))

    def close(self) -> None:
        self.tar.close()


def _check(reader: HashingReader, expected: Digest, what: str) -> None:
    if reader.read(1):
        raise DigestMismatchError(f"{what} {expected} is longer than when it was measured")
    if reader.digest != expected:
        raise DigestMismatchError(
            f"{what} hashes to {reader.digest}, expected {expected}",
            expected=expected.value,
            actual=reader.digest.value,
        )


def _image_manifest(store: Store, digest: Digest, platform: Platform | None) -> Manifest:
    doc = store.read_manifest(digest)
    if isinstance(doc, Index):
        doc = store.read_manifest(doc.select(platform or Platform.host()).digest)
        if isinstance(doc, Index):
            raise ArchiveError(f"image {digest.short}: nested indexes are not supported in docker archives")
    return doc


def _grouped(images: Sequence[tuple[str | None, Digest]]) -> dict[Digest, list[reference.Reference]]:
    groups: dict[Digest, list[reference.Reference]] = {}
    for name, digest in images:
        refs = groups.setdefault(Digest.parse(digest), [])
        if name:
            refs.append(reference.parse(name))
    return groups


def save_docker_archive(
    store: Store, images: Sequence[tuple[str | None, Digest]], out: Sink, *, platform: Platform | None = None
) -> None:
    """Write ``images`` (name or None, manifest/index digest) as a ``docker save`` tar to ``out``.

    Layout: ``<config hex>.json``, ``<diff_id hex>/layer.tar`` (uncompressed), ``manifest.json``,
    ``repositories``. An index is resolved to ``platform`` (default: the host's).
    """
    tar = _TarOut(out)
    entries: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for digest, refs in _grouped(images).items():
        manifest = _image_manifest(store, digest, platform)
        config_bytes = store.read_blob(manifest.config.digest)
        manifest.config.digest.verify(config_bytes, what="image config")
        diff_ids = ImageConfig.parse(config_bytes).diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise DigestMismatchError(f"image {digest.short}: layer count differs from its config's diff_ids")
        layer_paths = []
        for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
            path = f"{diff_id.hex}/layer.tar"
            if path not in tar.written:
                _add_uncompressed_layer(store, tar, path, layer.digest, diff_id)
            layer_paths.append(path)
        config_path = f"{manifest.config.digest.hex}.json"
        if config_path not in tar.written:
            tar.add_bytes(config_path, config_bytes)
        tags = [r for r in refs if r.tag]
        entries.append({"Config": config_path, "RepoTags": [r.familiar() for r in tags] or None, "Layers": layer_paths})
        for ref in tags:
            if diff_ids:
                repo = reference.Reference(ref.registry, ref.repository).familiar()
                repositories.setdefault(repo, {})[str(ref.tag)] = diff_ids[-1].hex
    tar.add_bytes("manifest.json", json.dumps(entries, separators=(",", ":")).encode())
    tar.add_bytes("repositories", json.dumps(repositories, separators=(",", ":"), sort_keys=True).encode())
    tar.close()


def _add_uncompressed_layer(store: Store, tar: _TarOut, path: str, blob: Digest, diff_id: Digest) -> None:
    # A tar header needs the size first and stdout cannot seek back: measure (and verify) in a first pass,
    # stream in a second. Decompressing twice is cheaper than spooling a layer to disk.
    with store.open_blob(blob) as f:
        measured = HashingReader(open_decompressed(f), diff_id.algorithm)
        measured.drain()
    if measured.digest != diff_id:
        raise DigestMismatchError(
            f"layer {blob.short} decompresses to {measured.digest}, expected diff_id {diff_id}",
            expected=diff_id.value,
            actual=measured.digest.value,
        )
    tar.add_dir(posixpath.dirname(path) + "/")
    with store.open_blob(blob) as f:
        reader = HashingReader(open_decompressed(f), diff_id.algorithm)
        tar.add_stream(path, measured.size, reader)
        _check(reader, diff_id, f"layer {blob.short} (uncompressed)")


def _closure(store: Store, digest: Digest) -> Iterator[Digest]:
    """``digest`` and every blob it references, leaves first (shared blobs may repeat)."""
    doc = store.read_manifest(digest)
    if isinstance(doc, Index):
        for child in doc.manifests:
            yield from _closure(store, child.digest)
    else:
        yield doc.config.digest
        yield from (layer.digest for layer in doc.layers)
    yield digest


def save_oci_layout(store: Store, images: Sequence[tuple[str | None, Digest]], out: Sink) -> None:
    """Write ``images`` (name or None, manifest/index digest) as an OCI image layout tar to ``out``.

    Blobs are copied byte for byte, so every digest is kept. ``index.json`` names each tagged image with
    ``org.opencontainers.image.ref.name`` (the tag) and ``io.containerd.image.name`` (the full reference).
    """
    tar = _TarOut(out)
    tar.add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    tar.add_dir("blobs/")
    index: list[dict[str, Any]] = []
    for digest, refs in _grouped(images).items():
        for blob in _closure(store, digest):
            path = f"blobs/{blob.algorithm}/{blob.hex}"
            if path in tar.written:
                continue
            tar.add_dir(f"blobs/{blob.algorithm}/")
            with store.open_blob(blob) as f:
                reader = HashingReader(f, blob.algorithm)
                tar.add_stream(path, store.blob_size(blob), reader)
                _check(reader, blob, "blob")
        doc = store.read_manifest(digest)
        top = Descriptor(doc.media_type, digest, len(doc.raw))
        named: list[reference.Reference | None] = list(refs) or [None]
        for ref in named:
            entry = top.to_dict()
            if ref is not None:
                entry["annotations"] = {ANNOTATION_IMAGE_NAME: str(ref)}
                if ref.tag:
                    entry["annotations"][ANNOTATION_REF_NAME] = ref.tag
            index.append(entry)
    doc_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}
    tar.add_bytes("index.json", json.dumps(doc_index, separators=(",", ":")).encode())
    tar.close()


# -- load ---------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    """What streaming through an archive left behind: small metadata files and blobs stored by path."""

    meta: dict[str, bytes]
    blobs: dict[str, Digest]  # verbatim blobs (OCI blobs/, or docker files stored as they were)
    layers: dict[str, LayerDigests]  # uncompressed docker layer tars, gzip'ed on the way into the store
    links: dict[str, str]

    def resolve(self, path: str) -> str:
        for _ in range(16):
            if path not in self.links:
                return path
            path = self.links[path]
        raise CorruptArchiveError(f"archive link loop at {path!r}")


def save_archive(
    store: Store, images: Sequence[tuple[str | None, Digest]], fmt: str, dest: str | None, stdout: IO[bytes]
) -> None:
    """Save ``images`` as ``fmt`` ("docker" or "oci") to ``dest`` — atomically (temp file + rename), so a failed save
    never leaves a partial archive under that name — or to ``stdout`` when ``dest`` is None or ``-``."""
    save = save_oci_layout if fmt == "oci" else save_docker_archive
    if dest is None or dest == "-":
        save(store, images, stdout)
        stdout.flush()
        return
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            save(store, images, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_metadata(path: str) -> bool:
    base = posixpath.basename(path)
    return path.endswith(".json") or base in ("repositories", "oci-layout", "json", "VERSION")


def _read_entries(store: Store, stream: Readable) -> _Loaded:
    loaded = _Loaded({}, {}, {}, {})
    reader = TarReader(open_decompressed(stream))
    for e in reader:
        path = "/".join(safe_parts(e.name))
        if e.type in (LNK, SYM):
            target = e.linkname if e.type == LNK else posixpath.join(posixpath.dirname(path), e.linkname)
            loaded.links[path] = posixpath.normpath(target).lstrip("/")
            continue
        if not e.is_file:
            continue
        m = _BLOB_PATH.match(path)
        if m:
            try:
                digest = Digest(f"{m.group(1)}:{m.group(2)}")
            except InvalidDigestError:
                raise CorruptArchiveError(f"archive entry {path!r} is not a valid blob name") from None
            if not store.claim(digest):
                with store.blob_writer(digest, e.size) as w:
                    _copy(reader, w)
                    w.commit()
            loaded.blobs[path] = digest
        elif _is_metadata(path):
            if e.size > _MAX_METADATA:
                raise CorruptArchiveError(f"archive metadata file {path!r} is too large ({e.size} bytes)")
            loaded.meta[path] = reader.read()
        else:
            head = reader.read(512)
            with store.blob_writer() as w:
                if detect(head) == "none":
                    writer = CompressingWriter(w, "gzip")
                    writer.write(head)
                    _copy(reader, writer)
                    loaded.layers[path] = writer.finish()
                    w.commit()
                else:
                    w.write(head)
                    _copy(reader, w)
                    loaded.blobs[path] = w.commit()
    reader.drain()
    return loaded


def _copy(source: Readable, sink: Sink) -> None:
    while chunk := source.read(_CHUNK):
        sink.write(chunk)


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptArchiveError(f"archive {what} is not valid JSON: {e}") from None


def _layer_from_blob(store: Store, digest: Digest) -> LayerDigests:
    """A stored layer blob as a gzip or zstd layer: kept if already so, else re-compressed with gzip."""
    with store.open_blob(digest) as f:
        kind = detect(f.read(8))
    with store.open_blob(digest) as f:
        unpacked = HashingReader(open_decompressed(f))
        if kind in ("gzip", "zstd"):
            unpacked.drain()
            return LayerDigests(unpacked.digest, digest, store.blob_size(digest), unpacked.size, kind)
        with store.blob_writer() as w:
            writer = CompressingWriter(w, "gzip")
            _copy(unpacked, writer)
            layer = writer.finish()
            w.commit()
        return layer


def _load_docker(store: Store, loaded: _Loaded) -> list[LoadedImage]:
    entries = _json(loaded.meta["manifest.json"], "manifest.json")
    if not isinstance(entries, list):
        raise CorruptArchiveError("archive manifest.json is not a list")
    images: list[LoadedImage] = []
    for entry in entries:
        try:
            config_path = loaded.resolve(str(entry["Config"]))
            layer_paths = [loaded.resolve(str(p)) for p in entry.get("Layers") or []]
            tags = [str(t) for t in entry.get("RepoTags") or []]
        except (KeyError, TypeError, AttributeError):
            raise CorruptArchiveError(f"malformed manifest.json entry {str(entry)[:200]}") from None
        if config_path in loaded.meta:
            config_bytes = loaded.meta[config_path]
        elif config_path in loaded.blobs:
            config_bytes = store.read_blob(loaded.blobs[config_path])
        else:
            raise CorruptArchiveError(f"archive lacks the image config {config_path!r}")
        config_desc = store.write_blob(config_bytes)
        config = ImageConfig.parse(config_bytes)
        if len(config.diff_ids) != len(layer_paths):
            raise CorruptArchiveError(f"image config {config_path!r}: diff_ids do not match the listed layers")
        layers: list[Descriptor] = []
        for path, diff_id in zip(layer_paths, config.diff_ids, strict=True):
            if path in loaded.layers:
                layer = loaded.layers[path]
            elif path in loaded.blobs:
                layer = loaded.layers[path] = _layer_from_blob(store, loaded.blobs[path])
            else:
                raise CorruptArchiveError(f"archive lacks layer {path!r}")
            if layer.diff_id != diff_id:
                raise DigestMismatchError(
                    f"archive layer {path!r} hashes to {layer.diff_id}, but its config says {diff_id}",
                    expected=diff_id.value,
                    actual=layer.diff_id.value,
                )
            layers.append(Descriptor(layer.media_type, layer.digest, layer.size))
        manifest = Manifest.build(Descriptor(OCI_CONFIG, config_desc.digest, config_desc.size), layers)
        store.write_blob(manifest.raw)
        desc = manifest.descriptor(config.platform)
        names: list[str | None] = [str(reference.parse(t)) for t in tags] or [None]
        images.extend(LoadedImage(name, desc) for name in names)
    return images


def _check_closure(store: Store, desc: Descriptor) -> None:
    if not store.has_blob(desc.digest):
        raise CorruptArchiveError(f"archive lacks blob {desc.digest} referenced by its index")
    doc = store.read_manifest(desc.digest, desc.media_type)
    if isinstance(doc, Index):
        for child in doc.manifests:
            _check_closure(store, child)
        return
    for blob in (doc.config, *doc.layers):
        if not store.has_blob(blob.digest):
            raise CorruptArchiveError(f"archive lacks blob {blob.digest} referenced by manifest {desc.digest}")


def _oci_name(annotations: dict[str, str]) -> str | None:
    name = annotations.get(ANNOTATION_IMAGE_NAME) or annotations.get(ANNOTATION_REF_NAME) or ""
    if "/" not in name and ":" not in name:
        return None  # a bare tag ("latest") names no repository
    try:
        return str(reference.parse(name))
    except InvalidReferenceError:
        return None


def _load_oci(store: Store, loaded: _Loaded) -> list[LoadedImage]:
    index = Index.parse(loaded.meta["index.json"], OCI_INDEX)
    images = []
    for desc in index.manifests:
        _check_closure(store, desc)
        images.append(LoadedImage(_oci_name(desc.annotations), desc))
    return images


def load_archive(store: Store, stream: Readable, *, tag: bool = True) -> list[LoadedImage]:
    """Load a docker-archive or OCI-layout tar (optionally compressed) into the store; see the module contract.

    Named images are tagged in the store (as ``docker load`` does) unless ``tag`` is False. An archive with
    both ``index.json`` and ``manifest.json`` (docker 25+) is read as an OCI layout.
    """
    loaded = _read_entries(store, stream)
    try:
        if "index.json" in loaded.meta:
            images = _load_oci(store, loaded)
        elif "manifest.json" in loaded.meta:
            images = _load_docker(store, loaded)
        else:
            raise CorruptArchiveError("not an image archive: it has neither index.json nor manifest.json")
    except RegistryProtocolError as e:  # what imgci.oci raises for a malformed document
        raise CorruptArchiveError(f"archive holds a malformed image document: {e}") from None
    if tag:
        for image in images:
            if image.name:
                store.set_ref(image.name, image.descriptor)
    return images
