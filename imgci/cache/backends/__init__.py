"""Cache import/export backends: a registry ref, a local directory (CI cache), and the inline cache's reader.

Contract: :func:`make_importer` turns a ``--cache-from`` :class:`CacheSpec` into an
:class:`imgci.cache.manager.Importer` and :func:`make_exporter` a ``--cache-to`` spec into an :class:`Exporter`
(``type=inline`` has no exporter: the builder writes the records into the image config, see
:mod:`.artifact` for the format, so :func:`make_exporter` returns None for it). Nothing is contacted or read
here: importers are lazy, exporters act in ``export``. :func:`fetcher` adapts a build's
:class:`~imgci.cache.manager.BuildCache` into the ``fetch`` an exporter uses for blobs an imported hit left remote.

Modules: ``spec`` (flag parsing), ``artifact`` (the exported format, media types), ``base`` (the Exporter
protocol and result), ``registry``, ``localdir`` (+ ``layout``: its files on disk), ``inline``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from imgci.cache.backends.base import Exporter, ExportResult, Fetch, Note
from imgci.cache.backends.spec import CacheSpec, parse_cache_from, parse_cache_to, parse_size
from imgci.oci import Descriptor, Platform

if TYPE_CHECKING:
    from imgci.cache.manager import BuildCache, Importer

__all__ = [
    "CacheSpec",
    "ExportResult",
    "Exporter",
    "fetcher",
    "make_exporter",
    "make_importer",
    "parse_cache_from",
    "parse_cache_to",
    "parse_size",
]


def _quiet(message: str) -> None:
    pass


def make_importer(
    spec: CacheSpec,
    *,
    client_factory: Callable[[str], Any] | None = None,
    platform: Platform | None = None,
    on_note: Note = _quiet,
) -> Importer:
    from imgci import reference

    if spec.type == "registry":
        from imgci.cache.backends.registry import RegistryImporter

        if client_factory is None:
            raise ValueError("a registry cache needs a client_factory")
        return RegistryImporter(reference.parse(spec.location), client_factory, platform=platform, on_note=on_note)
    if spec.type == "local":
        from imgci.cache.backends.localdir import LocalDirImporter

        return LocalDirImporter(Path(spec.location), on_note=on_note)
    raise ValueError(f"no importer for cache type {spec.type!r}")


def make_exporter(
    spec: CacheSpec,
    *,
    client_factory: Callable[[str], Any] | None = None,
    mount_from: Iterable[str] = (),
    on_note: Note = _quiet,
) -> Exporter | None:
    from imgci import reference

    if spec.type == "registry":
        from imgci.cache.backends.registry import RegistryExporter

        if client_factory is None:
            raise ValueError("a registry cache needs a client_factory")
        return RegistryExporter(reference.parse(spec.location), client_factory, mount_from=mount_from, on_note=on_note)
    if spec.type == "local":
        from imgci.cache.backends.localdir import LocalDirExporter

        return LocalDirExporter(Path(spec.location), max_size=spec.max_size, on_note=on_note)
    if spec.type == "inline":
        return None
    raise ValueError(f"no exporter for cache type {spec.type!r}")


def fetcher(*caches: BuildCache) -> Fetch:
    """Fetch a blob an imported cache hit of any of ``caches`` left remote (a no-op for blobs no importer
    promised): one build's cache, or those of every matrix entry exporting to the same place."""

    def fetch(descriptor: Descriptor) -> None:
        for cache in caches:
            cache.ensure([SimpleNamespace(descriptor=descriptor)])

    return fetch
