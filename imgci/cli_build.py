"""``imgci build``: flags (docker/buildx spelling), wiring of store, resolver, solver and layer store, outputs.

Contract: every flag is validated before anything is built; the image goes into the local store under each
``-t`` name (``--output type=image``, the default) and to every other ``--output``; ``--iidfile`` gets the
manifest digest and ``--metadata-file`` buildx's keys. ``--cache-from`` importers go to the builder in the order
given; after the outputs every ``--cache-to`` exporter runs, a failure being a warning unless its spec says
``ignore-error=false``. Progress goes to stderr; stdout carries only the image digest (``--quiet``) or an archive
(``--output type=oci|docker,dest=-``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from imgci.errors import ImgciError, UsageError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from imgci.cli import cmd_build_entry

    p = sub.add_parser(
        "build",
        help="Build an image from a Dockerfile.",
        description="Build an image from a Dockerfile (docker build / buildx build flags).",
        parents=[common],
    )
    p.set_defaults(handler=cmd_build_entry)
    p.add_argument("context", metavar="PATH", help="build context directory")
    p.add_argument("-t", "--tag", action="append", default=[], help="name[:tag] (repeatable)")
    p.add_argument("-f", "--file", help="Dockerfile (default PATH/Dockerfile; - reads it from stdin)")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY[=VALUE]", help="build-time variable")
    p.add_argument("--target", help="build this stage (default: the last)")
    p.add_argument("--platform", help="target platform os/arch[/variant] (default: host)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="set a label on the image")
    p.add_argument("--no-cache", action="store_true", help="run every step (results are still cached)")
    p.add_argument(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="run every step of this stage, reuse the cache elsewhere (repeatable)",
    )
    p.add_argument("--pull", action="store_true", help="always pull base images, even when in the local store")
    p.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="SPEC",
        help="import a build cache: REF | type=registry,ref=REF | type=local,src=DIR (repeatable; tried in order)",
    )
    p.add_argument(
        "--cache-to",
        action="append",
        default=[],
        metavar="SPEC",
        help="export the build cache: type=registry,ref=REF | type=local,dest=DIR[,max-size=SIZE] | type=inline "
        "[,mode=min|max][,ignore-error=true|false] (repeatable)",
    )
    p.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="SPEC",
        help="type=image|registry|oci|docker|local[,dest=…][,push=true] (repeatable; default type=image)",
    )
    p.add_argument("--push", action="store_true", help="shorthand for --output type=registry")
    p.add_argument("--iidfile", help="write the image (manifest) digest to this file")
    p.add_argument("--metadata-file", help="write build metadata as JSON (buildx keys) to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image digest")
    add_engine_flags(p)
    p.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="id=ID[,src=PATH|env=VAR]",
        help="secret for RUN --mount=type=secret (repeatable; never stored in the image, cache or log)",
    )
    p.add_argument(
        "--ssh",
        action="append",
        default=[],
        metavar="default|ID[=SOCKET]",
        help="SSH agent socket for RUN --mount=type=ssh (default: $SSH_AUTH_SOCK)",
    )
    p.add_argument(
        "--network",
        choices=["default", "host", "none"],
        default="default",
        help="network for RUN steps without --network (default: host)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """How layers are made: compression, RUN snapshotter and sandbox (``build`` and ``run`` share them)."""
    p.add_argument("--compression", choices=["gzip", "zstd", "uncompressed"], default="gzip", help="layer compression")
    p.add_argument(
        "-b",
        "--backend",
        choices=["auto", "native", "overlay"],
        default="auto",
        help="RUN snapshotter: overlay (kernel overlayfs) or native (copy and diff); auto probes (img's -b)",
    )
    p.add_argument(
        "--isolation",
        choices=["auto", "userns", "chroot"],
        default=os.environ.get("IMGCI_ISOLATION", "auto"),
        help="RUN sandbox: userns (rootless), chroot (root in an unprivileged container); auto probes",
    )


def _build_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid --build-arg {item!r}: expected KEY=VALUE or KEY")
        if eq:
            out[key] = value
        elif key in os.environ:  # docker: --build-arg KEY takes the value from the environment
            out[key] = os.environ[key]
    return out


def _secrets(items: list[str]) -> dict[str, bytes]:
    """``--secret id=ID[,src=PATH|source=PATH|env=VAR][,type=file|env]`` as buildx parses it."""
    out: dict[str, bytes] = {}
    for item in items:
        fields: dict[str, str] = {}
        for part in item.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                raise UsageError(f"invalid --secret {item.split(',')[0]}…: expected key=value fields")
            fields[key.strip().lower()] = value
        secret_id = fields.get("id", "")
        src = fields.get("src") or fields.get("source") or ""
        env = fields.get("env", "")
        if fields.get("type") == "env" and not env:
            env, src = src or secret_id, ""
        if not secret_id:
            secret_id = src.rsplit("/", 1)[-1] if src else env
        if not secret_id:
            raise UsageError("invalid --secret: it needs id=")
        if src:
            try:
                out[secret_id] = Path(src).expanduser().read_bytes()
            except OSError as e:
                raise UsageError(f"--secret id={secret_id}: cannot read {src}: {e.strerror}") from None
        else:
            name = env or secret_id
            if name not in os.environ:
                raise UsageError(f"--secret id={secret_id}: environment variable {name} is not set")
            out[secret_id] = os.environ[name].encode()
    return out


def _ssh(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        ssh_id, _, path = item.partition("=")
        ssh_id = ssh_id or "default"
        sock = path or os.environ.get("SSH_AUTH_SOCK", "")
        if not sock:
            raise UsageError(f"--ssh {item}: no socket given and SSH_AUTH_SOCK is not set")
        if "," in sock:
            raise UsageError(f"--ssh {item}: only one socket per id is supported")
        if not Path(sock).exists():
            raise UsageError(f"--ssh {item}: {sock} does not exist")
        out[ssh_id] = str(Path(sock).resolve())
    return out


def _cache_line(summary: dict[str, Any]) -> str:
    """``Cache: 5 of 7 steps reused (12.3 MiB, 4.1s saved); missed: [2/4] COPY src/ (COPY sources changed: app.py)``"""
    from imgci.ui import human_size

    hits, misses = summary["hits"], summary["misses"]
    line = f"Cache: {hits} of {hits + misses} steps reused"
    if hits:
        line += f" ({human_size(summary['bytes_reused'])}, {summary['time_saved']:.1f}s saved)"
    reasons = [s for s in summary["steps"] if not s["cached"] and s["reason"] != "parent step missed"]
    if reasons:
        shown = "; ".join(f"{s['step']} ({s['reason']})" for s in reasons[:3])
        line += f"; missed: {shown}" + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    return line


def _export_caches(
    specs: list[Any],
    result: Any,
    store: Any,
    client_factory: Any,
    *,
    mount_from: list[str],
    compression: str,
    quiet: bool,
) -> None:
    """Run every ``--cache-to`` exporter after the build, best effort: a failure is a warning unless the spec
    says ``ignore-error=false`` (then the build fails, naming the cache). Layers are exported as built: a
    ``compression=`` other than the build's ``--compression`` is noted, not applied."""
    from imgci.cache.backends import fetcher, make_exporter

    if result.cache is None:
        return
    for spec in specs:
        exporter = make_exporter(
            spec, client_factory=client_factory, mount_from=mount_from, on_note=lambda m: print(m, file=sys.stderr)
        )
        if exporter is None:  # type=inline: the builder put the records in the image config
            continue
        if spec.compression != compression or spec.extra.get("force-compression") == "true":
            print(
                f"note: cache export to {exporter.describe()}: compression={spec.compression} is not applied; "
                f"layers are exported as built (--compression {compression})",
                file=sys.stderr,
            )
        records = result.cache.records_for_export(spec.mode, result.state.cache_key)
        try:
            done = exporter.export(records, store, fetcher(result.cache))
        except ImgciError as e:
            message = f"cache export to {exporter.describe()} failed: {e.message}"
            if not spec.ignore_error:
                raise ImgciError(message, hint=e.hint or "ignore-error=true makes this a warning") from None
            print(f"warning: {message}", file=sys.stderr)
            continue
        if not quiet:
            print(done.summary(), file=sys.stderr)


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key or not eq:
            raise UsageError(f"invalid --label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _warm_up_pushes(outputs: list[Any], tags: list[str], client_factory: Any) -> threading.Thread | None:
    """With a push to come, connect to its registries in the background while the build runs: importing the HTTP
    stack, loading the CA bundle, the TLS handshake, the registry's auth challenge and a push token are ~0.1 s that
    the push would otherwise start with (a cached rebuild that only pushes is mostly that). Best effort: the push
    meets any failure again and reports it."""
    from imgci import reference
    from imgci.pushhelper import connect

    pushing = [n for o in outputs if o.type == "image" and o.push for n in [*tags, *o.names]]
    names = sorted({str(reference.parse(n)) for n in pushing})
    if not names:
        return None
    thread = threading.Thread(target=connect, args=(names, client_factory), name="imgci-push-warm-up", daemon=True)
    thread.start()
    return thread


def run_build(args: argparse.Namespace, store: Any, client_factory: Any) -> int:
    from imgci import reference
    from imgci.build.outputs import parse_output

    context = Path(args.context)
    if not context.is_dir():
        hint = f"to run a build file: imgci run {context}" if context.suffix in (".yaml", ".yml") else None
        raise UsageError(f"build context {context} is not a directory", hint=hint)
    tags = [str(reference.parse(t)) for t in args.tag]
    outputs = [parse_output(o) for o in args.output]
    if args.push:
        outputs.append(parse_output("type=registry"))
    if not any(o.type == "image" for o in outputs):
        outputs.insert(0, parse_output("type=image"))
    if any(o.type == "image" and o.push for o in outputs) and not tags and not any(o.names for o in outputs):
        raise UsageError("--push needs a name: add -t NAME")
    # Forked as early as it can be (no thread may run yet): its connecting then overlaps all of the build's own
    # start (importing the builder is ~30 ms).
    helper = _push_helper(store, outputs, tags, client_factory)
    try:
        return _request_and_run(args, store, client_factory, context, tags, outputs, helper)
    finally:
        if helper is not None:
            helper.close()


def _request_and_run(
    args: argparse.Namespace,
    store: Any,
    client_factory: Any,
    context: Path,
    tags: list[str],
    outputs: list[Any],
    helper: Any,
) -> int:
    from imgci.build.builder import BuildRequest
    from imgci.cache.backends import parse_cache_from, parse_cache_to
    from imgci.oci import Platform

    cache_from = [parse_cache_from(s) for s in args.cache_from]
    cache_to = [parse_cache_to(s) for s in args.cache_to]
    build_args = _build_args(args.build_arg)
    epoch_text = os.environ.get("SOURCE_DATE_EPOCH") or build_args.get("SOURCE_DATE_EPOCH")
    try:
        epoch = int(epoch_text) if epoch_text else None
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH must be an integer (seconds), got {epoch_text!r}") from None
    dockerfile_text = None
    dockerfile = None
    if args.file == "-":
        dockerfile_text = sys.stdin.read()
    elif args.file:
        dockerfile = Path(args.file)
    request = BuildRequest(
        context=context,
        dockerfile=dockerfile,
        dockerfile_text=dockerfile_text,
        tags=tags,
        build_args=build_args,
        target=args.target,
        platform=Platform.parse(args.platform) if args.platform else None,
        labels=_labels(args.label),
        compression="none" if args.compression == "uncompressed" else args.compression,
        docker_media_types=any(o.type == "docker" for o in outputs),
        source_date_epoch=epoch,
        isolation=args.isolation,
        backend=args.backend,
        secrets=_secrets(args.secret),
        ssh=_ssh(args.ssh),
        network=args.network,
        no_cache=args.no_cache,
        no_cache_filter=[f for item in args.no_cache_filter for f in item.split(",") if f],
        inline_cache=any(spec.type == "inline" for spec in cache_to),
        on_image_blob=helper.announce if helper is not None else None,  # pushed while later steps run
    )
    return _run_build(args, store, client_factory, request, outputs, tags, cache_from, cache_to, helper)


def _push_helper(store: Any, outputs: list[Any], tags: list[str], client_factory: Any) -> Any:
    """A forked :class:`imgci.pushhelper.PushHelper` for the one pushing output's names, or None."""
    from imgci import reference

    pushing = [o for o in outputs if o.type == "image" and o.push]
    if len(pushing) != 1:
        return None
    names = [str(reference.parse(n)) for n in [*tags, *(n for n in pushing[0].names if n not in tags)]]
    from imgci.pushhelper import PushHelper

    return PushHelper.start(store.root, names, client_factory)


def _run_build(
    args: argparse.Namespace,
    store: Any,
    client_factory: Any,
    request: Any,
    outputs: list[Any],
    tags: list[str],
    cache_from: list[Any],
    cache_to: list[Any],
    helper: Any,
) -> int:
    from imgci import reference
    from imgci.build.builder import Builder
    from imgci.build.layerstore import LayerStore
    from imgci.build.outputs import export, metadata
    from imgci.build.resolver import StoreResolver
    from imgci.build.solver import Solver
    from imgci.buildui import BuildProgress
    from imgci.cache.backends import make_importer

    progress = BuildProgress("quiet" if args.quiet else (args.progress or "auto"))
    request.cache_importers = [
        make_importer(spec, client_factory=client_factory, platform=request.platform, on_note=progress.note)
        for spec in cache_from
    ]
    solver = Solver(
        max_workers=max(2, os.cpu_count() or 2),
        on_event=progress.event,
        on_log=lambda v, line: progress.log(v.key, v.name, line),
    )
    layer_store = LayerStore(store)
    resolver = StoreResolver(store, client_factory=client_factory, pull="always" if args.pull else "missing")
    builder = Builder(store, resolver=resolver, solver=solver, layer_store=layer_store, on_note=progress.note)
    warm_up = None if helper is not None else _warm_up_pushes(outputs, tags, client_factory)
    ok = False
    try:
        result = builder.build(request)
        ok = True
    finally:
        progress.close(ok)
        solver.close()
        layer_store.close()
    if warm_up is not None:
        warm_up.join()
    info: dict[str, Any] = {}
    push_duration = 0.0  # seconds the outputs spent pushing (the metadata file's imgci.push_duration)
    for spec in outputs:
        facts = export(
            store,
            spec,
            manifest=result.manifest,
            descriptor=result.descriptor,
            names=tags,
            client_factory=client_factory,
            pusher=helper.push if helper is not None and spec.push else None,
        )
        push_duration += facts.pop("push_duration", 0.0)
        info.update(facts)
    mount_from = [spec.location for spec in cache_from if spec.type == "registry"] + tags
    _export_caches(
        cache_to,
        result,
        store,
        client_factory,
        mount_from=mount_from,
        compression=args.compression,
        quiet=args.quiet,
    )
    digest = result.descriptor.digest.value
    if args.iidfile:
        Path(args.iidfile).write_text(digest)
    cache_summary = result.cache.summary() if result.cache is not None else None
    if args.metadata_file:
        extra = {
            "imgci.dockerfile": result.dockerfile,
            "imgci.stages": result.stages,
            "imgci.duration": round(result.duration, 3),
        }
        if cache_summary is not None:
            extra["imgci.cache"] = cache_summary
        if "pushed" in info:
            extra["imgci.pushed"] = info["pushed"]
            extra["imgci.push_duration"] = round(push_duration, 3)
        Path(args.metadata_file).write_text(
            json.dumps(metadata(result.manifest, result.descriptor, tags, extra), indent=2) + "\n"
        )
    if args.quiet:
        print(digest)
    else:
        for name in tags:
            print(f"Successfully built {reference.parse(name).familiar()}", file=sys.stderr)
        print(f"Image digest: {digest} ({result.steps} steps in {result.duration:.1f}s)", file=sys.stderr)
        if cache_summary is not None and (cache_summary["hits"] or cache_summary["misses"]):
            print(_cache_line(cache_summary), file=sys.stderr)
    return 0
