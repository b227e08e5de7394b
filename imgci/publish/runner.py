"""``imgci run build.yaml``: every matrix entry built in one process, pushed, cached and reported.

Contract:
- :meth:`MatrixRun.prepare` validates the whole plan before anything starts: every entry's flags (secrets, cache
  specs, outputs, platforms) and Dockerfile (syntax, stages, ``target``). Every problem is collected and raised
  together as one :class:`PlanError`, each naming its file and line.
- :meth:`MatrixRun.run` builds all entries at once on ONE Builder and Solver: a step with the same key in two
  entries (a shared base stage) runs once. Each entry, as soon as it is built, is stored under its tags, written
  to its other outputs and pushed (each tag, with the registry client's bounded retries, counted). Unless
  ``keep_going``, the first failed build cancels the builds still running; an entry already built is still pushed
  and reported. A push failure never stops another entry.
- Skip what did not change: for an entry that pushes, the image key (:func:`imgci.build.builder.image_key`) is
  computed without building; when a tag in the registry already carries it, the entry is not rebuilt or
  re-uploaded — its missing tags are added (:func:`imgci.publish.push.retag`) and it is reported ``unchanged``.
- Cache export runs once per distinct ``cache_to`` spec after all entries, with the union of the records of every
  entry that named it (entries sharing one registry cache ref must not overwrite each other's records).
- Progress: locally a live view (tty tree or plain lines) of all entries; under a CI reporter each entry's log is
  buffered and printed as a collapsible group when the entry finishes, so parallel entries do not interleave.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from imgci import reference
from imgci.build.builder import IMAGE_KEY_LABEL, Builder, BuildRequest, BuildResult
from imgci.build.solver import Cancelled, VertexEvent
from imgci.buildui import BuildProgress
from imgci.config import Entry, Plan
from imgci.errors import BuildError, DockerfileError, ImgciError
from imgci.oci import Descriptor, Index, Manifest, Platform
from imgci.publish.ci import CIReporter
from imgci.publish.push import push_tag, remote_image, retag
from imgci.publish.report import CacheInfo, EntryReport, ErrorInfo, RunReport
from imgci.store import Store


@dataclass
class RunOptions:
    keep_going: bool = False
    dry_run: bool = False
    cache_from: list[str] = field(default_factory=list)  # added to every entry
    cache_to: list[str] = field(default_factory=list)
    isolation: str = "auto"
    backend: str = "auto"
    network: str = "default"
    compression: str = "gzip"
    jobs: int = 0  # entries built at once; 0 = all
    skip_unchanged: bool = True
    progress: str = "auto"  # the live view when no CI reporter buffers the logs


class PlanError(ImgciError):
    """One or more entries cannot be built as written (collected before anything started)."""

    def __init__(self, errors: list[tuple[Entry | None, ErrorInfo]]) -> None:
        self.errors = errors
        lines = [_located(err) for _, err in errors]
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines))


def _located(err: ErrorInfo) -> str:
    where = f"{err.file}:{err.line}: " if err.file and err.line else (f"{err.file}: " if err.file else "")
    return f"{where}{err.message}" if not err.message.startswith(where) or not where else err.message


def _relative(file: str) -> str:
    """A path as CI annotations want it: relative to the working directory (the checkout) when inside it."""
    if not file.startswith("/"):
        return file
    try:
        return str(Path(file).relative_to(Path.cwd()))
    except ValueError:
        return file


def error_info(e: BaseException, phase: str) -> ErrorInfo:
    if isinstance(e, DockerfileError | BuildError):
        return ErrorInfo(e.detail, e.hint or "", _relative(e.file), e.line, phase)
    if isinstance(e, ImgciError):
        file = _relative(str(getattr(e, "file", "") or ""))
        return ErrorInfo(e.message, e.hint or "", file, int(getattr(e, "line", 0) or 0), phase)
    return ErrorInfo(f"{type(e).__name__}: {e}", "", "", 0, phase)


@dataclass
class _EntryRun:
    entry: Entry
    report: EntryReport
    requests: list[BuildRequest]
    cache_to: list[Any]  # parsed CacheSpecs
    outputs: list[Any]  # parsed OutputSpecs other than the local store
    log: io.StringIO = field(default_factory=io.StringIO)
    progress: BuildProgress | None = None
    results: list[BuildResult] = field(default_factory=list)
    remote_keys: list[str] = field(default_factory=list)


class MatrixRun:
    """One ``imgci run``: see the module contract."""

    def __init__(
        self,
        plan: Plan,
        *,
        store: Store,
        client_factory: Any,
        reporter: CIReporter,
        options: RunOptions,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.plan = plan
        self.store = store
        self.client_factory = client_factory
        self.reporter = reporter
        self.options = options
        self.out = out
        self.err = err
        self.buffered = bool(reporter.provider)
        self._print_lock = threading.Lock()
        self._stop = threading.Event()
        self._runs: dict[str, _EntryRun] = {}
        self._key_labels: dict[str, tuple[str, ...]] = {}
        self._all_tags: list[str] = []
        self._live: BuildProgress | None = None

    # -- validation ---------------------------------------------------------------------------------------------
    def prepare(self) -> list[_EntryRun]:
        from imgci.build.dockerfile import parse_dockerfile, predefined_args, stages_needed
        from imgci.build.outputs import parse_output
        from imgci.cache.backends import parse_cache_from, parse_cache_to
        from imgci.cli_build import _secrets, _ssh

        problems: list[tuple[Entry | None, ErrorInfo]] = []
        runs: list[_EntryRun] = []
        try:  # the command line's, for every entry: checked once, and not blamed on a build.yaml line
            extra_from = [parse_cache_from(s) for s in self.options.cache_from]
            extra_to = [parse_cache_to(s) for s in self.options.cache_to]
        except ImgciError as e:
            raise PlanError([(None, ErrorInfo(e.message, e.hint or "", phase="config"))]) from None
        for entry in self.plan.entries:
            report = EntryReport(
                id=entry.id,
                target=entry.target,
                label=entry.label,
                matrix=dict(entry.matrix),
                tags=list(entry.tags),
                platforms=list(entry.platforms) or [str(Platform.host().normalized())],
                dockerfile=self._display_path(entry.dockerfile) if entry.dockerfile else "(inline)",
            )
            try:
                platforms: list[Platform | None] = [Platform.parse(p).normalized() for p in entry.platforms]
                platforms = platforms or [None]
                cache_from = [*(parse_cache_from(s) for s in entry.cache_from), *extra_from]
                cache_to = [*(parse_cache_to(s) for s in entry.cache_to), *extra_to]
                outputs = [parse_output(o) for o in entry.outputs]
                outputs = [o for o in outputs if not (o.type == "image" and not o.push)]
                secrets = _secrets(entry.secrets)
                ssh = _ssh(entry.ssh)
                text = entry.dockerfile_inline
                path = str(entry.dockerfile) if entry.dockerfile else "Dockerfile (inline)"
                if text is None:
                    assert entry.dockerfile is not None
                    text = entry.dockerfile.read_text(encoding="utf-8")
                df = parse_dockerfile(text, self._display_path(entry.dockerfile) if entry.dockerfile else path)
                host = Platform.host()
                for p in platforms:
                    stages_needed(df, entry.stage, entry.args, predefined=predefined_args(p or host, host))
            except (OSError, UnicodeDecodeError) as e:
                problems.append((entry, self._field_error(entry, "dockerfile", f"cannot read the Dockerfile: {e}")))
                continue
            except DockerfileError as e:
                problems.append((entry, error_info(e, "config")))
                continue
            except ImgciError as e:
                problems.append((entry, self._field_error(entry, "", e.message, e.hint or "")))
                continue
            requests = []
            for p in platforms:
                requests.append(
                    BuildRequest(
                        context=entry.context,
                        dockerfile=entry.dockerfile,
                        dockerfile_text=entry.dockerfile_inline,
                        tags=list(entry.tags),
                        build_args=dict(entry.args),
                        target=entry.stage,
                        platform=p,
                        labels=dict(entry.labels),
                        compression="none" if self.options.compression == "uncompressed" else self.options.compression,
                        isolation=self.options.isolation,
                        backend=self.options.backend,
                        secrets=secrets,
                        ssh=ssh,
                        network=self.options.network,
                        no_cache=entry.no_cache,
                        inline_cache=any(s.type == "inline" for s in cache_to),
                        label=entry.id,
                        record_key=True,
                        cache_importers=list(cache_from),  # specs here; importers are made at run time
                    )
                )
            runs.append(_EntryRun(entry, report, requests, [s for s in cache_to if s.type != "inline"], outputs))
        if problems:
            raise PlanError(problems)
        return runs

    def _display_path(self, path: Path | None) -> str:
        return _relative(str(path)) if path is not None else ""

    def _field_error(self, entry: Entry, name: str, message: str, hint: str = "") -> ErrorInfo:
        loc = entry.field_locations.get(name) or entry.location
        return ErrorInfo(f"{entry.label}: {message}", hint, loc.file, loc.line, "config")

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self, runs: list[_EntryRun]) -> RunReport:
        started = time.monotonic()
        report = RunReport(
            config=str(self.plan.path),
            entries=[r.report for r in runs],
            ci=self.plan.ci.values(),
            provider=self.reporter.provider,
            push=any(r.entry.push for r in runs),
            dry_run=self.options.dry_run,
        )
        if self.options.dry_run:
            for r in runs:
                r.report.status = "planned"
            report.duration = time.monotonic() - started
            return report
        self._runs = {r.entry.id: r for r in runs}
        self._all_tags = [t for r in runs for t in r.report.tags]
        from imgci.build.layerstore import LayerStore
        from imgci.build.resolver import StoreResolver
        from imgci.build.solver import Solver

        if not self.buffered:
            self._live = BuildProgress(self.options.progress, out=self.err)
        for r in runs:
            r.progress = BuildProgress("plain", out=r.log)
        import os

        solver = Solver(max_workers=max(2, os.cpu_count() or 2), on_event=self._event, on_log=self._vertex_log)
        layer_store = LayerStore(self.store)
        resolver = StoreResolver(self.store, client_factory=self.client_factory)
        builder = Builder(self.store, resolver=resolver, solver=solver, layer_store=layer_store, on_note=self._note)
        self._say(f"imgci: {len(runs)} entries from {self.plan.path}: " + ", ".join(r.entry.label for r in runs))
        try:
            workers = self.options.jobs or len(runs)
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="imgci-entry") as pool:
                futures = [pool.submit(self._run_entry, builder, r) for r in runs]
                for f in futures:
                    f.result()
        finally:
            if self._live is not None:
                self._live.close(all(r.report.ok for r in runs))
            solver.close()
            layer_store.close()
        self._export_caches(runs)
        report.duration = time.monotonic() - started
        return report

    def _run_entry(self, builder: Builder, run: _EntryRun) -> None:
        rep = run.report
        started = time.monotonic()
        try:
            if self._stop.is_set():
                raise Cancelled("cancelled")
            if self._may_skip(run) and self._try_unchanged(builder, run):
                return
            self._build(builder, run)
            rep.build_seconds = time.monotonic() - started
            self._store_and_push(run)
        except Cancelled:
            rep.status = "cancelled"
        except KeyboardInterrupt:
            rep.status = "cancelled"
            self._stop.set()
            raise
        except BaseException as e:
            rep.status = "failed"
            rep.error = error_info(e, "build" if not run.results else "push")
            if rep.build_seconds == 0:
                rep.build_seconds = time.monotonic() - started
            if not self.options.keep_going and not run.results:
                self._stop.set()
                builder.solver.cancel_all()
        finally:
            rep.total_seconds = time.monotonic() - started
            self._finish_entry(run)

    def _may_skip(self, run: _EntryRun) -> bool:
        return run.entry.push and self.options.skip_unchanged and not run.entry.no_cache and bool(run.report.tags)

    def _requests(self, run: _EntryRun) -> list[BuildRequest]:
        from imgci.cache.backends import make_importer

        out = []
        for req in run.requests:
            importers = [
                make_importer(s, client_factory=self.client_factory, platform=req.platform, on_note=self._note)
                for s in req.cache_importers
            ]
            out.append(replace(req, cache_importers=importers))
        return out

    def _try_unchanged(self, builder: Builder, run: _EntryRun) -> bool:
        """True when a tag in the registry already holds this entry's image (and the other tags now do too)."""
        rep = run.report
        try:
            keys = [builder.compute_key(replace(req, label="", cache_importers=[])) for req in run.requests]
        except (Cancelled, KeyboardInterrupt):
            raise
        except ImgciError:
            return False  # the real build reports the problem, located
        key = keys[0] if len(keys) == 1 else _index_key(keys)
        rep.image_key = key
        found = None
        existing: dict[str, str] = {}
        for tag in rep.tags:
            try:
                image = remote_image(reference.parse(tag), self.client_factory)
            except ImgciError as e:
                self._entry_log(run, f"cannot check {tag} in the registry ({e.message}); building")
                return False
            if image is None:
                continue
            existing[tag] = image.digest
            if image.key == key and found is None:
                found = image
        if found is None:
            return False
        self._entry_log(run, f"{found.ref} already has this image (key {key[:19]}): not rebuilding")
        rep.status = "unchanged"
        rep.digest = found.digest
        for tag in rep.tags:
            if existing.get(tag) == found.digest:
                continue
            info = retag(self.store, found, tag, client_factory=self.client_factory, log=partial(self._entry_log, run))
            rep.pushes.append(info)
            if not info.ok:
                rep.status = "failed"
                rep.error = ErrorInfo(f"adding tag {tag}: {info.error}", phase="push")
        rep.size = _remote_size(found)
        return True

    def _build(self, builder: Builder, run: _EntryRun) -> None:
        requests = self._requests(run)
        if len(requests) == 1:
            run.results = [builder.build(requests[0])]
        else:
            with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="imgci-platform") as pool:
                run.results = [f.result() for f in [pool.submit(builder.build, r) for r in requests]]
        rep = run.report
        rep.steps = sum(r.steps for r in run.results)
        for result in run.results:
            if result.cache is not None:
                s = result.cache.summary()
                c = rep.cache
                rep.cache = CacheInfo(
                    c.hits + s["hits"],
                    c.misses + s["misses"],
                    c.bytes_reused + s["bytes_reused"],
                    c.time_saved + s["time_saved"],
                )

    def _store_and_push(self, run: _EntryRun) -> None:
        from imgci.build.outputs import export

        rep = run.report
        if len(run.results) == 1:
            result = run.results[0]
            descriptor, manifest = result.descriptor, result.manifest
            rep.image_key = result.image_key
            rep.size = _size(result.manifest, result.descriptor)
        else:
            key = _index_key([r.image_key for r in run.results])
            index = Index.build([r.descriptor for r in run.results], annotations={IMAGE_KEY_LABEL: key})
            written = self.store.write_blob(index.raw)
            descriptor = Descriptor(index.media_type, written.digest, written.size)
            manifest = run.results[0].manifest
            rep.image_key = key
            rep.size = written.size + sum(_size(r.manifest, r.descriptor) for r in run.results)
        rep.digest = descriptor.digest.value
        rep.status = "built"
        for tag in rep.tags:
            self.store.set_ref(tag, descriptor)
        for spec in run.outputs:
            export(self.store, spec, manifest=manifest, descriptor=descriptor, names=rep.tags, client_factory=None)
        if not run.entry.push:
            return
        push_started = time.monotonic()
        mount_from = [s.location for r in run.requests for s in r.cache_importers if s.type == "registry"]
        for tag in rep.tags:
            info = push_tag(
                self.store,
                tag,
                client_factory=self.client_factory,
                mount_from=[*mount_from, *rep.tags, *self._all_tags],  # other entries' repositories: mount, not upload
                log=lambda m: self._entry_log(run, m),
            )
            rep.pushes.append(info)
            if not info.ok and rep.error is None:
                rep.status = "failed"
                rep.error = ErrorInfo(f"push of {tag} failed: {info.error}", phase="push")
        rep.push_seconds = time.monotonic() - push_started

    def _export_caches(self, runs: list[_EntryRun]) -> None:
        """One export per distinct cache_to spec, with the union of its entries' records."""
        from imgci.cache.backends import fetcher, make_exporter

        groups: dict[str, tuple[Any, list[_EntryRun]]] = {}
        for r in runs:
            if not r.results:
                continue
            for spec in r.cache_to:
                groups.setdefault(spec.raw or f"{spec.describe()},mode={spec.mode}", (spec, []))[1].append(r)
        for spec, members in groups.values():
            notes: list[str] = []
            # the entries' images and registry caches may hold the layers already: mount them, not upload
            mount_from = [t for r in members for t in r.report.tags]
            mount_from += [
                c.location for r in members for req in r.requests for c in req.cache_importers if c.type == "registry"
            ]
            exporter = make_exporter(
                spec, client_factory=self.client_factory, mount_from=mount_from, on_note=notes.append
            )
            if exporter is None:
                continue
            records: dict[str, Any] = {}
            caches = []
            for r in members:
                for result in r.results:
                    if result.cache is None:
                        continue
                    caches.append(result.cache)
                    for record in result.cache.records_for_export(spec.mode, result.state.cache_key):
                        records.setdefault(record.key, record)
            try:
                done = exporter.export(list(records.values()), self.store, fetcher(*caches))
                line = f"cache export to {exporter.describe()}: {done.summary()}"
            except ImgciError as e:
                line = f"warning: cache export to {exporter.describe()} failed: {e.message}"
                if not spec.ignore_error:
                    for r in members:
                        if r.report.error is None:
                            r.report.status = "failed"
                            r.report.error = ErrorInfo(line.removeprefix("warning: "), phase="cache-export")
            for r in members:
                r.report.cache_exports.append(line)
            self._say(line)
            for note in notes:
                self._say(note)

    # -- output -------------------------------------------------------------------------------------------------
    def _finish_entry(self, run: _EntryRun) -> None:
        rep = run.report
        if run.progress is not None:
            run.progress.close(rep.ok)
        took = f"{rep.total_seconds:.1f}s"
        what = {
            "built": f"built {rep.digest[:19]} in {took}",
            "unchanged": f"unchanged ({rep.digest[:19]}), nothing rebuilt",
            "failed": f"FAILED after {took}",
            "cancelled": "cancelled",
        }.get(rep.status, rep.status)
        with self._print_lock:
            if self.buffered:
                self.reporter.begin_entry(rep, f"{rep.label}: {what}")
                self.out.write(run.log.getvalue())
                self.out.flush()
                self.reporter.end_entry(rep)
            lines = [] if self.buffered else [f"=> {rep.label}: {what}"]
            if rep.error is not None:
                self.reporter.annotate_error(rep.error, title=f"imgci: {rep.label}")
                if not self.buffered or not rep.error.file:
                    lines.append(f"error: {rep.label}: {_located(rep.error)}")
                    if rep.error.hint:
                        lines.append(f"hint: {rep.error.hint}")
            for line in lines:
                if self._live is not None:
                    self._live.note(line)  # above the live view, which redraws below it
                else:
                    self.err.write(line + "\n")
            self.err.flush()

    def _say(self, line: str) -> None:
        with self._print_lock:
            (self.out if self.buffered else self.err).write(line + "\n")
            (self.out if self.buffered else self.err).flush()

    def _note(self, message: str) -> None:
        if self._live is not None:
            self._live.note(message)
        else:
            self._say(message)

    def _entry_log(self, run: _EntryRun, line: str) -> None:
        if self.buffered:
            run.log.write(line + "\n")
        else:
            self._note(f"{run.entry.label}: {line}")

    def _event(self, e: VertexEvent) -> None:
        if not e.labels:
            return  # a key computation (skip-unchanged check): no work of its own to show
        self._key_labels[e.key] = e.labels
        if self._live is not None:
            self._live.event(e)
        for label in e.labels:
            run = self._runs.get(label)
            if run is not None and run.progress is not None:
                run.progress.event(e)

    def _vertex_log(self, vertex: Any, line: str) -> None:
        labels = self._key_labels.get(vertex.key, ())
        if self._live is not None and labels:
            self._live.log(vertex.key, vertex.name, line)
        for label in labels:
            run = self._runs.get(label)
            if run is not None and run.progress is not None:
                run.progress.log(vertex.key, vertex.name, line)


def _size(manifest: Manifest, descriptor: Descriptor) -> int:
    return descriptor.size + manifest.config.size + sum(layer.size for layer in manifest.layers)


def _remote_size(image: Any) -> int:
    from imgci.oci import INDEX_TYPES

    if image.media_type in INDEX_TYPES:
        return len(image.raw)
    m = Manifest.parse(image.raw, image.media_type)
    return len(image.raw) + m.config.size + sum(layer.size for layer in m.layers)


def _index_key(keys: list[str]) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256("\n".join(keys).encode()).hexdigest()
