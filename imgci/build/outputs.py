"""Build outputs (``--output``, buildx's spelling) and the metadata file.

Contract: ``parse_output(spec)`` validates one ``--output`` value up front (before anything is built):
``type=image`` (default: tag into the local store; ``push=true`` also pushes), ``type=registry`` (= image + push),
``type=oci,dest=FILE`` / ``type=docker,dest=FILE`` (archives; ``dest=-`` is stdout), ``type=local,dest=DIR``
(the final root file system). A bare value (``-o DIR``) means ``type=local,dest=DIR``.
``export`` carries out one output for a built image; ``metadata`` returns buildx-compatible keys.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgci.errors import UsageError
from imgci.oci import Descriptor, Digest, Manifest
from imgci.store import Store

_TYPES = {"image", "registry", "oci", "docker", "local"}


@dataclass(frozen=True)
class OutputSpec:
    type: str
    dest: str = ""
    push: bool = False
    names: tuple[str, ...] = ()
    attrs: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def parse_output(spec: str) -> OutputSpec:
    if "=" not in spec:
        if spec == "-":
            raise UsageError("--output - is ambiguous: use type=oci,dest=- or type=docker,dest=-")
        return OutputSpec("local", dest=spec)
    attrs: dict[str, str] = {}
    for part in spec.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise UsageError(f"invalid --output {spec!r}: {part!r} is not key=value")
        attrs[k.strip()] = v.strip()
    kind = attrs.pop("type", "")
    if kind not in _TYPES:
        raise UsageError(f"invalid --output {spec!r}: type must be one of {', '.join(sorted(_TYPES))}")
    dest = attrs.pop("dest", "")
    push = attrs.pop("push", "false").lower() in ("true", "1", "yes") or kind == "registry"
    names = tuple(n for n in attrs.pop("name", "").split(";") if n) if "name" in attrs else ()
    if kind in ("oci", "docker", "local") and not dest:
        raise UsageError(f"invalid --output {spec!r}: type={kind} needs dest=")
    if kind == "local" and dest == "-":
        raise UsageError("type=local needs a directory, not -")
    return OutputSpec("image" if kind == "registry" else kind, dest=dest, push=push, names=names, attrs=attrs)


def export(
    store: Store,
    spec: OutputSpec,
    *,
    manifest: Manifest,
    descriptor: Descriptor,
    names: list[str],
    client_factory: Any = None,
    progress: Any = None,
    pusher: Any = None,
) -> dict[str, Any]:
    """Carry out one output; returns facts for the metadata file (e.g. pushed digests). ``pusher``, when given,
    pushes the names instead of this process (``imgci.pushhelper.PushHelper.push``)."""
    info: dict[str, Any] = {}
    all_names = list(names) + [n for n in spec.names if n not in names]
    if spec.type == "image":
        from imgci import reference

        normalised = [str(reference.parse(n)) for n in all_names]
        for n in normalised:
            store.set_ref(n, descriptor)
        if spec.push:
            if not normalised:
                raise UsageError("pushing needs a name: give -t NAME (or name= in --output)")
            pushed = []
            started = time.monotonic()
            if pusher is not None:
                digests, _ = pusher(normalised)
                pushed = [n for n in normalised if n in digests]
                info["pushed_digest"] = digests[normalised[-1]]
            else:
                from imgci.transfer import push_image

                for n in normalised:
                    result = push_image(store, n, reference.parse(n), client_factory=client_factory, progress=progress)
                    pushed.append(n)
                    info["pushed_digest"] = result.digest.value
            info["pushed"] = pushed
            info["push_duration"] = time.monotonic() - started
        info["names"] = normalised
    elif spec.type in ("oci", "docker"):
        from imgci.archive import save_archive

        images: list[tuple[str | None, Digest]] = [(n, descriptor.digest) for n in all_names]
        save_archive(store, images or [(None, descriptor.digest)], spec.type, spec.dest, sys.stdout.buffer)
        info["dest"] = spec.dest
    elif spec.type == "local":
        from imgci.layerfs import unpack_image

        dest = Path(spec.dest)
        if dest.exists() and any(dest.iterdir()):
            raise UsageError(f"--output type=local: {dest} is not empty")
        unpack_image(store, manifest, dest)
        info["dest"] = str(dest)
    return info


def metadata(manifest: Manifest, descriptor: Descriptor, names: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """buildx's --metadata-file keys (containerimage.digest, image.name, …) plus imgci's own under ``imgci.*``."""
    out: dict[str, Any] = {
        "containerimage.config.digest": manifest.config.digest.value,
        "containerimage.descriptor": {
            "mediaType": descriptor.media_type,
            "digest": descriptor.digest.value,
            "size": descriptor.size,
        },
        "containerimage.digest": descriptor.digest.value,
    }
    if descriptor.platform is not None:
        out["containerimage.descriptor"]["platform"] = descriptor.platform.to_dict()
    if names:
        out["image.name"] = ",".join(names)
    out.update(extra)
    return out
