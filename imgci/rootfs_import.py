"""``docker import``: a rootfs tarball becomes a one-layer image in the store.

Contract: :func:`import_rootfs` reads a rootfs tarball (any compression, detected), re-writes its entries into a
normalised PAX tar layer (names made relative; ``..``, NUL, hardlinks out of the archive and non-directories
named ``.`` raise :class:`UnsafeArchiveError`), stores layer, config and OCI manifest, and returns the manifest's
descriptor; the caller sets the ref. Equal content, options and ``created`` (``SOURCE_DATE_EPOCH`` when not
given) give an equal manifest digest, whatever the input's compression or tar dialect.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tarfile
from pathlib import Path
from typing import IO, Any, cast

from imgci.compression import CompressingWriter, LayerDigests, Readable, Sink, layer_media_type, open_decompressed
from imgci.errors import ArchiveError, CorruptArchiveError, UnsafeArchiveError, UsageError
from imgci.oci import OCI_CONFIG, Descriptor, ImageConfig, Manifest, Platform
from imgci.store import Store
from imgci.tarstream import AREG, CONT, LNK, REG, SYM, TarEntry, TarReader, safe_parts

DEFAULT_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# --change keys, matched case-insensitively: image config names and Dockerfile instruction names.
_CHANGE_KEYS = {
    "cmd": "Cmd",
    "entrypoint": "Entrypoint",
    "shell": "Shell",
    "env": "Env",
    "workingdir": "WorkingDir",
    "workdir": "WorkingDir",
    "user": "User",
    "labels": "Labels",
    "label": "Labels",
    "exposedports": "ExposedPorts",
    "expose": "ExposedPorts",
    "volumes": "Volumes",
    "volume": "Volumes",
    "stopsignal": "StopSignal",
}


def created_timestamp(created: str | None = None) -> str:
    """``created`` if given, else ``SOURCE_DATE_EPOCH`` (if set), else now — as RFC 3339 UTC."""
    if created:
        return created
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        except (ValueError, OverflowError):
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix timestamp") from None
    else:
        when = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_strings(value: str) -> list[str] | None:
    """``value`` as a JSON array of strings (Dockerfile exec form), or None if it is not one."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed) else None


def _exec_form(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return _json_strings(value) or ["/bin/sh", "-c", value]  # else shell form, as in a Dockerfile
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{key} must be a list of strings or a command line, got {value!r}")


def _pairs(value: Any) -> list[tuple[str, str]]:
    """``K=V`` strings (one, or a list) or a mapping, as (K, V) pairs."""
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    items = [value] if isinstance(value, str) else list(value)
    pairs = []
    for item in items:
        k, eq, v = str(item).partition("=")
        if not eq or not k:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        pairs.append((k, v))
    return pairs


def _container_config(changes: dict[str, Any] | None) -> dict[str, Any]:
    """The image config's ``config`` section: PATH plus ``changes`` (config or Dockerfile names, any case)."""
    config: dict[str, Any] = {"Env": [DEFAULT_ENV]}
    for raw_key, value in (changes or {}).items():
        key = _CHANGE_KEYS.get(raw_key.lower())
        if key is None:
            supported = ", ".join(sorted({k for k in _CHANGE_KEYS.values()}))
            raise UsageError(f"unsupported image change {raw_key!r} (supported: {supported})")
        if key in ("Cmd", "Entrypoint", "Shell"):
            config[key] = _exec_form(key, value)
        elif key == "Env":
            env = dict(_pairs(config["Env"]))
            env.update(_pairs(value))
            config["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif key == "Labels":
            config["Labels"] = {**config.get("Labels", {}), **dict(_pairs(value))}
        elif key in ("ExposedPorts", "Volumes"):
            if isinstance(value, str):
                value = _json_strings(value) or value.split()
            if key == "ExposedPorts":  # docker records ports with their protocol: 80 -> 80/tcp
                value = [v if "/" in str(v) else f"{v}/tcp" for v in value]
            config[key] = {**config.get(key, {}), **{str(v): {} for v in value}}
        else:
            config[key] = str(value)
    return config


# -- import -------------------------------------------------------------------------------------------------------
def _normalised_tarinfo(e: TarEntry) -> tarfile.TarInfo:
    parts = safe_parts(e.name)
    if not parts and not e.is_dir:
        raise UnsafeArchiveError(f"{e.name!r}: a non-directory entry cannot replace the root")
    info = tarfile.TarInfo("/".join(parts) or ".")
    info.type = REG if e.type in (AREG, CONT) else e.type
    info.size = e.size if e.is_file else 0
    info.mode = e.mode
    info.uid, info.gid, info.uname, info.gname = e.uid, e.gid, e.uname, e.gname
    info.mtime = int(e.mtime) if float(e.mtime).is_integer() else e.mtime
    info.devmajor, info.devminor = e.devmajor, e.devminor
    if e.type == LNK:
        target = safe_parts(e.linkname, what=f"hardlink {e.name!r} target")
        if not target:
            raise UnsafeArchiveError(f"{e.name!r}: hardlink to the root directory")
        info.linkname = "/".join(target)
    elif e.type == SYM:
        if not e.linkname or "\x00" in e.linkname:
            raise CorruptArchiveError(f"{e.name!r}: symlink with an empty or NUL-containing target")
        info.linkname = e.linkname
    info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
    return info


def normalise_tar(source: Readable, sink: Sink, compression: str = "gzip") -> LayerDigests:
    """Re-write the tar stream ``source`` entry by entry into ``sink`` (compressed), with normalised names."""
    writer = CompressingWriter(sink, compression)
    reader = TarReader(source)
    with tarfile.open(fileobj=cast(IO[bytes], writer), mode="w|", format=tarfile.PAX_FORMAT) as out:
        for entry in reader:
            out.addfile(_normalised_tarinfo(entry), cast(IO[bytes], reader) if entry.is_file else None)
    reader.drain()
    return writer.finish()


def import_rootfs(
    store: Store,
    source: Path | str | Readable,
    *,
    platform: Platform,
    changes: dict[str, Any] | None = None,
    compression: str = "gzip",
    created: str | None = None,
    comment: str = "Imported from tarball",
) -> Descriptor:
    """Store a one-layer image made from the rootfs tarball ``source``; returns its manifest descriptor."""
    config_section = _container_config(changes)
    layer_media_type(compression)  # reject a bad compression before reading anything
    with contextlib.ExitStack() as stack:
        if isinstance(source, str | Path):
            try:
                fileobj: Readable = stack.enter_context(open(source, "rb"))
            except OSError as e:
                raise ArchiveError(f"cannot read {source}: {e.strerror or e}") from None
        else:
            fileobj = source
        blob = stack.enter_context(store.blob_writer())
        layer = normalise_tar(open_decompressed(fileobj), blob, compression)
        blob.commit()
    when = created_timestamp(created)
    platform = platform.normalized()
    doc: dict[str, Any] = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        doc["variant"] = platform.variant
    doc.update(
        created=when,
        config=config_section,
        rootfs={"type": "layers", "diff_ids": [layer.diff_id.value]},
        history=[{"created": when, "created_by": "imgci import", "comment": comment}],
    )
    config_bytes = ImageConfig(doc).to_bytes()
    config = store.write_blob(config_bytes)
    manifest = Manifest.build(
        Descriptor(OCI_CONFIG, config.digest, config.size),
        [Descriptor(layer.media_type, layer.digest, layer.size)],
    )
    store.write_blob(manifest.raw)
    return manifest.descriptor(platform)
