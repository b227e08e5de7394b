"""``imgci build``: Dockerfile → vertices (the dispatcher) → solver → image in the store.

Contract: :meth:`Builder.build` parses the Dockerfile, resolves every base image of the stages the target needs
(local store first, then the registry), converts each instruction — expanded with its stage's ARG/ENV scope, as
BuildKit's dockerfile2llb does — into a solver vertex whose key is the hash of its parent's key and its own
expanded instruction, solves the target's last vertex (independent stages run concurrently), applies ``--label``,
and writes config + manifest. Identical steps — in two stages, or two builds on one Builder — run once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgci.build import steps as S
from imgci.build.dockerfile import (
    AddInstruction,
    ArgInstruction,
    ArgScope,
    CmdInstruction,
    CopyInstruction,
    Dockerfile,
    EntrypointInstruction,
    EnvInstruction,
    ExposeInstruction,
    HealthcheckInstruction,
    Instruction,
    LabelInstruction,
    MaintainerInstruction,
    OnbuildInstruction,
    RunInstruction,
    ShellInstruction,
    StopsignalInstruction,
    UserInstruction,
    VolumeInstruction,
    WorkdirInstruction,
    base_of,
    parse_dockerfile,
    parse_trigger,
    predefined_args,
    resolve_copy_from,
    resolve_mount_from,
    stages_needed,
)
from imgci.build.image import DEFAULT_PATH, INLINE_CACHE_KEY, ImageState, Layer, assemble
from imgci.build.resolver import ImageResolver, ResolvedImage
from imgci.build.runstep import RunStep
from imgci.build.solver import RunContext, Solver, Vertex
from imgci.cache.keys import base_key, step_key
from imgci.cache.manager import BuildCache, CacheBlobUnavailable
from imgci.cache.records import delta
from imgci.errors import BuildError, DockerfileError, ImgciError, UsageError
from imgci.oci import OCI_CONFIG, OCI_MANIFEST, Descriptor, Digest, Manifest, Platform
from imgci.store import Store

STEP_TYPE = "imgci.step.v1"
IMAGE_KEY_TYPE = "imgci.image.v1"
IMAGE_KEY_LABEL = "dev.imgci.image-key"  # recorded in the config when BuildRequest.record_key (imgci run does)
# Build arg names that suggest a secret (docker's SecretsUsedInArgOrEnv check looks for the same words).
_SECRET_LIKE_ARG = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|CREDENTIAL", re.IGNORECASE)


@dataclass
class BuildRequest:
    context: Path
    dockerfile: Path | None = None  # default: <context>/Dockerfile
    dockerfile_text: str | None = None  # `-f -`: the Dockerfile came on stdin
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    platform: Platform | None = None
    labels: dict[str, str] = field(default_factory=dict)
    compression: str = "gzip"
    docker_media_types: bool = False
    source_date_epoch: int | None = None
    isolation: str = "auto"  # RUN sandbox: auto | userns | chroot
    backend: str = "auto"  # RUN snapshotter: auto | overlay | native
    secrets: dict[str, bytes] = field(default_factory=dict)
    ssh: dict[str, str] = field(default_factory=dict)
    network: str = "default"  # RUN's network when the instruction does not say: default (= host) | host | none
    no_cache: bool = False
    no_cache_filter: list[str] = field(default_factory=list)
    cache_importers: list[Any] = field(default_factory=list)  # imgci.cache.manager.Importer, in --cache-from order
    inline_cache: bool = False  # --cache-to type=inline: the final chain's cache records in the image config
    label: str = ""  # names this build in the solver's events (a matrix entry), see Solver.solve
    record_key: bool = False  # put the image key in the config's labels (IMAGE_KEY_LABEL)
    # Called with each blob of the image being built once it is in the store, from the first layer a step writes
    # on (not for a build whose steps were all cached): `build --push` pushes them while later steps run.
    on_image_blob: Callable[[Descriptor], None] | None = None


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    descriptor: Descriptor
    state: ImageState
    dockerfile: str
    stages: list[str]
    steps: int
    duration: float
    cache: Any = None  # imgci.cache.manager.BuildCache of this build
    image_key: str = ""  # see image_key()


def _announce_image_blobs(last: Vertex, store: Store, announce: Callable[[Descriptor], None]) -> None:
    """Make the vertices of the image's own chain (the target stage, and the stages it is FROM) hand each layer of
    their result to ``announce`` — once a step of that chain has written a layer; until then (a build that turns
    out fully cached pushes nothing new) the layers seen are kept back. A layer whose blob a cache hit left
    remote is not announced (the push fetches and pushes it as before)."""
    lock = threading.Lock()
    sent: set[Digest] = set()
    kept: list[Descriptor] = []
    live = False  # a step of the chain has written a layer

    def saw(state: ImageState, parent: Any, cached: bool) -> None:
        nonlocal live
        with lock:
            if not cached and isinstance(parent, ImageState) and len(state.layers) > len(parent.layers):
                live = True
            for layer in state.layers:
                if layer.descriptor.digest not in sent:
                    sent.add(layer.descriptor.digest)
                    kept.append(layer.descriptor)
            if not live:
                return
            ready = [d for d in kept if store.has_blob(d.digest)]
            kept.clear()
            for descriptor in ready:
                announce(descriptor)

    def wrap(run: Callable[[RunContext, list[Any]], Any]) -> Callable[[RunContext, list[Any]], Any]:
        def announcing(ctx: RunContext, inputs: list[Any]) -> Any:
            result = run(ctx, inputs)
            if isinstance(result, ImageState):
                saw(result, inputs[0] if inputs else None, ctx.cached)
            return result

        return announcing

    vertex: Vertex | None = last
    while vertex is not None:
        vertex.run = wrap(vertex.run)
        vertex = vertex.inputs[0] if vertex.inputs else None


def image_key(final_step_key: str, req: BuildRequest) -> str:
    """The identity of the image a request produces: its last step's cache key (which roots in the base image
    digests, the platform, every instruction and every input's content) plus what is applied after the steps.
    Equal keys mean the same image, so ``imgci run`` can skip a build whose key the registry's image carries."""
    doc = {
        "type": IMAGE_KEY_TYPE,
        "final": final_step_key,
        "labels": dict(sorted(req.labels.items())),
        "compression": req.compression,
        "docker_media_types": req.docker_media_types,
        "inline_cache": req.inline_cache,
        "source_date_epoch": req.source_date_epoch,
    }
    return "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def secret_arg_warnings(build_args: dict[str, str]) -> list[str]:
    """One warning per build arg whose name looks like a secret's (``*TOKEN*``, ``*PASSWORD*``…). It names the arg,
    never its value: build args end up in the image history and the cache keys, ``--secret`` values do not."""
    return [
        f"warning: build arg {name} looks like a secret: build args are stored in the image history and cache keys; "
        f"use --secret id={name.lower()},env={name} and RUN --mount=type=secret,id={name.lower()} instead"
        for name in sorted(build_args)
        if _SECRET_LIKE_ARG.search(name)
    ]


@dataclass
class _StageInfo:
    """What the dispatcher knows statically about a converted stage."""

    vertex: Vertex
    cfg_env: dict[str, str]
    onbuild: list[str]


def _key(*parts: Any) -> str:
    """A vertex's key within this process (the solver's run-once identity; not the build cache key)."""
    raw = json.dumps([STEP_TYPE, *parts], sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def _instruction_identity(instr: Instruction) -> dict[str, Any]:
    d = dataclasses.asdict(instr)
    d.pop("location", None)
    d["keyword"] = instr.keyword
    if isinstance(instr, AddInstruction):  # keys are exported with the cache: no URL credentials, even hashed
        from imgci.build.urls import redact_url, redact_urls

        d["original"] = redact_urls(instr.original)
        d["sources"] = [redact_url(s) for s in instr.sources]
    return d


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


_METADATA: dict[type, type[S.MetadataStep]] = {
    EnvInstruction: S.EnvStep,
    LabelInstruction: S.LabelStep,
    ExposeInstruction: S.ExposeStep,
    VolumeInstruction: S.VolumeStep,
    UserInstruction: S.UserStep,
    ShellInstruction: S.ShellStep,
    CmdInstruction: S.CmdStep,
    StopsignalInstruction: S.StopsignalStep,
    HealthcheckInstruction: S.HealthcheckStep,
    OnbuildInstruction: S.OnbuildStep,
    MaintainerInstruction: S.MaintainerStep,
}


class Builder:
    """Builds images into ``store``. One Builder (one Solver) may serve several builds, sharing identical steps."""

    def __init__(
        self,
        store: Store,
        *,
        resolver: ImageResolver,
        solver: Solver,
        layer_store: Any,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.solver = solver
        self.layers = layer_store
        self.on_note = on_note or (lambda m: None)

    # -- entry point ----------------------------------------------------------------------------------------
    def build(self, req: BuildRequest) -> BuildResult:
        start = time.monotonic()
        for warning in secret_arg_warnings(req.build_args):
            self.on_note(warning)
        path, dockerfile, platform, order, scope, context = self._prepare(req)
        for note in dockerfile.notes:
            self.on_note(f"note: {note}")
        cache = BuildCache(
            self.store,
            importers=list(req.cache_importers),
            disabled=req.no_cache,
            no_cache_stages={s.lower() for s in req.no_cache_filter},
            on_warning=lambda m: self.on_note(f"warning: {m}"),
        )
        for attempt in range(1, 4):
            cache.attempt = attempt
            try:
                return self._build_once(req, dockerfile, path, order, scope, platform, context, cache, start)
            except CacheBlobUnavailable as e:
                if attempt == 3:
                    raise BuildError(f"{e.message} (and again after two rebuilds without it)") from None
                self.on_note(f"warning: {e.message}; building those steps instead")
                cache.poison(e.keys)
            finally:
                if attempt == 3:
                    context.close()
        raise AssertionError("unreachable")

    def _prepare(self, req: BuildRequest) -> tuple[Path, Dockerfile, Platform, list[int], ArgScope, Any]:
        """The parsed Dockerfile, the platform, the stages the target needs in order, the ARG scope and the
        context of a request: what a build and a key computation both start from."""
        from imgci.build.context import BuildContext

        path, text = self._dockerfile(req)
        dockerfile = parse_dockerfile(text, str(path))
        platform = (req.platform or Platform.host()).normalized()
        predefined = predefined_args(platform, Platform.host())
        order = stages_needed(dockerfile, req.target, req.build_args, predefined=predefined)
        scope = ArgScope(dockerfile, req.build_args, predefined)
        context = BuildContext(
            req.context,
            dockerfile=None if req.dockerfile_text is not None else path,
            cache_dir=self.store.root / "cache" / "context",
        )
        return path, dockerfile, platform, order, scope, context

    def compute_key(self, req: BuildRequest) -> str:
        """The :func:`image_key` ``req`` would produce, without building: every step's cache key is computed from
        its parent's key, its instruction and its inputs (context file digests, base image digests — resolved,
        which may ask the registry for a manifest — and source stage keys), and nothing is run or stored."""
        start = time.monotonic()
        path, dockerfile, platform, order, scope, context = self._prepare(req)
        cache = BuildCache(self.store, importers=[], disabled=True, on_warning=lambda m: None)
        cache.attempt = 0  # vertex keys of their own: a key computation never shares a vertex with a real build
        try:
            result = self._build_once(
                req, dockerfile, path, order, scope, platform, context, cache, start, keys_only=True
            )
        finally:
            context.close()
        return result.image_key

    def _build_once(
        self,
        req: BuildRequest,
        dockerfile: Dockerfile,
        path: Path,
        order: list[int],
        scope: ArgScope,
        platform: Platform,
        context: Any,
        cache: BuildCache,
        start: float,
        *,
        keys_only: bool = False,
    ) -> BuildResult:
        epoch = req.source_date_epoch
        created = _rfc3339(epoch if epoch is not None else time.time())
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=self._tmp_root()))
        prestarted = contextlib.ExitStack()
        try:
            ws = S.Workspace(
                store=self.store,
                layers=self.layers,
                context=context,
                created=created,
                epoch=epoch,
                compression=req.compression,
                scratch=scratch,
                view=lambda state, description: self._view(state, description, cache),
                sandbox=self._sandbox_factory(req),
                secrets=dict(req.secrets),
                ssh=dict(req.ssh),
                network=req.network,
            )
            if not keys_only and any(
                isinstance(instr, RunInstruction) for i in order for instr in dockerfile.stages[i].instructions
            ):
                from imgci.build.sandbox.launcher import fork_server_prestarted

                # ~80 ms of interpreter start off the first RUN's path (cold or changed)
                prestarted.enter_context(fork_server_prestarted())
            stages: dict[int, _StageInfo] = {}
            count = 0
            for index in order:
                stages[index], n = self._convert_stage(
                    dockerfile, index, scope, platform, stages, ws, str(req.context), cache, keys_only
                )
                count += n
            final_info = stages[order[-1]]
            if req.on_image_blob is not None and not keys_only:
                _announce_image_blobs(final_info.vertex, self.store, req.on_image_blob)
            state: ImageState = self.solver.solve([final_info.vertex], label=req.label)[0]
            if keys_only:
                names = [dockerfile.stages[i].display_name for i in order]
                key = image_key(state.cache_key, req)
                empty = Manifest.build(Descriptor(OCI_CONFIG, Digest.of(b"{}"), 2), [])
                return BuildResult(
                    empty,
                    Descriptor(OCI_MANIFEST, Digest.of(empty.raw), len(empty.raw)),
                    state,
                    str(path),
                    names,
                    count,
                    time.monotonic() - start,
                    None,
                    key,
                )
            cache.ensure(state.layers)  # the image in the store is complete: fetch what cache hits left remote
        finally:
            prestarted.close()
            shutil.rmtree(scratch, ignore_errors=True)
        context.close()
        key = image_key(state.cache_key, req)
        if req.record_key:
            state = state.with_config(Labels={**(state.config.get("Labels") or {}), IMAGE_KEY_LABEL: key})
        if req.labels:
            labels = dict(state.config.get("Labels") or {})
            labels.update(req.labels)
            state = state.with_config(Labels=labels)
        if req.inline_cache:
            records = [json.loads(r.dumps()) for r in cache.records_for_export("min", state.cache_key)]
            state = state.evolve(base_extra={**state.base_extra, INLINE_CACHE_KEY: records})
        # The image is as new as its newest step: a rebuild served from the cache is the same image, byte for byte.
        stamps = [str(h["created"]) for h in state.history if h.get("created")] if count else []
        manifest, desc = assemble(
            self.store, state, created=max(stamps) if stamps else created, docker_media_types=req.docker_media_types
        )
        names = [dockerfile.stages[i].display_name for i in order]
        return BuildResult(manifest, desc, state, str(path), names, count, time.monotonic() - start, cache, key)

    def _sandbox_factory(self, req: BuildRequest) -> Callable[[], Any]:
        """The RUN sandbox, probed and made on first use (a build without RUN never probes)."""
        import threading

        lock = threading.Lock()
        made: list[Any] = []

        def get() -> Any:
            with lock:
                if not made:
                    from imgci.build.sandbox.launcher import Sandbox
                    from imgci.build.sandbox.probe import choose
                    from imgci.build.sandbox.probecache import probes_for_build

                    probes = probes_for_build(self.store.root, self._tmp_root())
                    choice = choose(req.isolation, req.backend, probes=probes)
                    for reason in choice.reasons:
                        self.on_note(f"sandbox: {reason}")
                    for warning in choice.warnings:
                        self.on_note(f"warning: {warning}")
                    made.append(
                        Sandbox(
                            self.store.root, choice, self.layers, on_warning=lambda w: self.on_note(f"warning: {w}")
                        )
                    )
                return made[0]

        return get

    def _tmp_root(self) -> Path:
        root = self.store.root / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _dockerfile(self, req: BuildRequest) -> tuple[Path, str]:
        if req.dockerfile_text is not None:
            return Path("Dockerfile (stdin)"), req.dockerfile_text
        path = req.dockerfile or req.context / "Dockerfile"
        try:
            return path, path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"cannot find the Dockerfile {path}", hint="pass -f PATH") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the Dockerfile {path}: {e}") from None

    def _view(self, state: ImageState, description: str, cache: BuildCache) -> Any:
        cache.ensure(state.layers)
        for layer in state.layers:
            self.layers.ensure_unpacked(layer.descriptor, layer.diff_id)
        return self.layers.view(state.diff_ids, description)

    # -- the dispatcher -------------------------------------------------------------------------------------
    def _convert_stage(
        self,
        df: Dockerfile,
        index: int,
        scope: ArgScope,
        target_platform: Platform,
        done: dict[int, _StageInfo],
        ws: S.Workspace,
        context_id: str,
        cache: BuildCache,
        keys_only: bool = False,
    ) -> tuple[_StageInfo, int]:
        stage = df.stages[index]
        from_ = stage.from_.expand(scope.global_values)
        platform = Platform.parse(from_.platform) if from_.platform else target_platform
        base = base_of(df, stage, scope.global_values)
        label = stage.display_name
        total = len(stage.instructions) + 1
        if base.kind == "stage":
            parent_info = done[int(base.ref)]
            # The child starts from the stage's image without its ONBUILD triggers (they run here, below).
            parent = Vertex(
                key=_key("from-stage", parent_info.vertex.key),
                name=f"[{label} 1/{total}] FROM {df.stages[int(base.ref)].display_name}",
                run=_without_onbuild,
                inputs=[parent_info.vertex],
            )
            cfg_env = dict(parent_info.cfg_env)
            onbuild = list(parent_info.onbuild)
        elif base.kind == "scratch":
            state0 = ImageState.scratch(platform).evolve(cache_key=base_key("", str(platform)))
            parent = Vertex(
                key=_key("scratch", str(platform), cache.attempt),
                name=f"[{label} 1/{total}] FROM scratch",
                run=_const(state0),
            )
            cfg_env = state0.env_map()
            onbuild = []
        else:
            resolved = self.resolver.resolve(str(base.ref), platform)
            layers = [
                Layer(d, diff) for d, diff in zip(resolved.manifest.layers, resolved.config.diff_ids, strict=True)
            ]
            state0 = ImageState.from_image(resolved.config, layers, resolved.name, resolved.digest.value)
            state0 = state0.with_config(OnBuild=None).evolve(cache_key=base_key(resolved.digest.value, str(platform)))
            cache.note_base(state0.cache_key, resolved.name, resolved.digest.value)
            name = f"[{label} 1/{total}] FROM {resolved.name}@{resolved.digest.value}"
            key0 = _key("from", resolved.digest.value, str(platform), cache.attempt)
            parent = Vertex(key=key0, name=name, run=_const(state0))
            cfg_env = state0.env_map()
            cfg_env.setdefault("PATH", DEFAULT_PATH)
            onbuild = list(resolved.config.config.get("OnBuild") or [])
        instructions: list[Instruction] = []
        if onbuild:
            instructions += [parse_trigger(t, stage.from_) for t in onbuild]
        instructions += stage.instructions
        env = dict(cfg_env)
        stage_args: dict[str, str | None] = {}
        cmd_set = False
        stage_onbuild: list[str] = []
        for pos, raw in enumerate(instructions, start=2):
            step: Any
            inputs: list[Vertex] = [parent]
            extra: dict[str, Any] = {}
            if isinstance(raw, ArgInstruction):
                bindings = scope.declare(raw, env)
                for b in bindings:
                    stage_args[b.name] = b.value
                    if b.value is not None:
                        env[b.name] = b.value
                step = S.ArgStep(raw, [(b.name, b.value) for b in bindings])
                extra["args"] = [(b.name, b.value) for b in bindings]
            elif isinstance(raw, RunInstruction):
                run = raw.expand(env)
                step, mount_inputs = self._run_step(df, run, platform, done, list(stage_args.items()), cache.attempt)
                inputs += mount_inputs
                extra["args"] = step.arg_env(cfg_env)
                extra["mounts"] = {str(k): v for k, v in step.source_identity.items()}
                raw = run
            else:
                instr = raw.expand(env)
                if isinstance(instr, EnvInstruction):
                    for k, v in instr.pairs:
                        env[k] = v
                        cfg_env[k] = v
                if isinstance(instr, CmdInstruction):
                    cmd_set = True
                if isinstance(instr, OnbuildInstruction):
                    stage_onbuild.append(instr.expression)
                if isinstance(instr, EntrypointInstruction):
                    step = S.EntrypointStep(instr, cmd_set)
                elif isinstance(instr, WorkdirInstruction):
                    step = S.WorkdirStep(instr)
                elif isinstance(instr, CopyInstruction | AddInstruction):
                    step, src_vertex = self._copy_step(df, instr, platform, done, cache.attempt)
                    if src_vertex is not None:
                        inputs.append(src_vertex)
                    extra["from"] = step.source_identity
                    extra["context"] = context_id if not step.source_key else ""
                elif type(instr) in _METADATA:
                    step = _METADATA[type(instr)](instr)
                else:
                    raise BuildError(
                        f"{instr.keyword} is not supported", file=instr.location.file, line=instr.location.start
                    )
                raw = instr
            key = _key(parent.key, _instruction_identity(raw), extra, str(platform))
            name = f"[{label} {pos}/{total}] {_display(raw)}"
            identity = _instruction_identity(raw)
            runner = self._runner(step, ws, cache, identity, str(platform), label, raw, keys_only)
            parent = Vertex(key=key, name=name, run=runner, inputs=inputs, data=raw)
        info = _StageInfo(parent, cfg_env, stage_onbuild)
        return info, len(instructions)

    def _copy_step(
        self,
        df: Dockerfile,
        instr: CopyInstruction | AddInstruction,
        platform: Platform,
        done: dict[int, _StageInfo],
        attempt: int,
    ) -> tuple[S.CopyStep, Vertex | None]:
        if not isinstance(instr, CopyInstruction) or instr.from_ is None:
            return S.CopyStep(instr, "", "context"), None  # the files' digests are the key, never the checkout path
        dep = resolve_copy_from(df, instr)
        assert dep is not None
        if dep.kind == "stage":
            src = done[int(dep.ref)].vertex
            return S.CopyStep(instr, f"stage:{dep.ref}", src.key), src
        if dep.kind == "scratch":
            raise BuildError(
                "COPY --from=scratch has nothing to copy", file=instr.location.file, line=instr.location.start
            )
        try:
            resolved = self.resolver.resolve(str(dep.ref), platform)
        except (DockerfileError, BuildError):
            raise
        except ImgciError as e:  # any other resolution failure is located at the COPY line
            raise BuildError(
                f"COPY --from={dep.ref}: {e.message}", hint=e.hint, file=instr.location.file, line=instr.location.start
            ) from None
        state0 = _image_state(resolved)
        src = Vertex(
            key=_key("from", resolved.digest.value, str(platform), attempt),
            name=f"FROM {resolved.name}",
            run=_const(state0),
        )
        return S.CopyStep(instr, f"image:{resolved.digest.value}", resolved.digest.value), src

    def _run_step(
        self,
        df: Dockerfile,
        instr: RunInstruction,
        platform: Platform,
        done: dict[int, _StageInfo],
        args: list[tuple[str, str | None]],
        attempt: int,
    ) -> tuple[RunStep, list[Vertex]]:
        """The RUN step and the vertices its ``--mount from=`` sources come from."""
        step = RunStep(instr, args)
        inputs: list[Vertex] = []
        for n, m in enumerate(instr.mount_options):
            if m.get("type", "bind") != "bind" or not m.get("from"):
                continue
            dep = resolve_mount_from(df, m["from"])
            if dep.kind == "stage":
                src = done[int(dep.ref)].vertex
                identity = src.key
            elif dep.kind == "scratch":
                raise BuildError(
                    "RUN --mount from=scratch has nothing to mount", file=instr.location.file, line=instr.location.start
                )
            else:
                try:
                    resolved = self.resolver.resolve(str(dep.ref), platform)
                except (DockerfileError, BuildError):
                    raise
                except ImgciError as e:
                    raise BuildError(
                        f"RUN --mount from={dep.ref}: {e.message}",
                        hint=e.hint,
                        file=instr.location.file,
                        line=instr.location.start,
                    ) from None
                src = Vertex(
                    key=_key("from", resolved.digest.value, str(platform), attempt),
                    name=f"FROM {resolved.name}",
                    run=_const(_image_state(resolved)),
                )
                identity = resolved.digest.value
            key = f"mount:{n}"
            step.mount_sources[n] = key
            step.source_identity[n] = identity
            inputs.append(src)
        return step, inputs

    def _runner(
        self,
        step: Any,
        ws: S.Workspace,
        cache: BuildCache,
        identity: dict[str, Any],
        platform: str,
        stage: str,
        instr: Instruction,
        keys_only: bool = False,
    ) -> Callable[[RunContext, list[Any]], Any]:
        shown = _display(instr)

        def run(ctx: RunContext, inputs: list[Any]) -> ImageState:
            parent: ImageState = inputs[0]
            local = dataclasses.replace(ws, sources=dict(ws.sources), log=ctx.log)
            src_state: ImageState | None = None
            if isinstance(step, S.CopyStep) and step.source_key:
                src_state = inputs[1]
            if isinstance(step, RunStep):
                local.states = {key: inputs[1 + i] for i, key in enumerate(step.mount_sources.values())}
                local.check = ctx.check
            ctx.check()
            try:
                step_inputs = step.cache_input(parent, local)
            except BuildError as e:  # e.g. a COPY source that does not exist: located at its instruction
                if e.line:
                    raise
                raise BuildError(e.detail, hint=e.hint, file=instr.location.file, line=instr.location.start) from None
            if src_state is not None:
                step_inputs["from"] = src_state.cache_key  # what the source stage or image is, by content
            public = {k: v for k, v in step_inputs.items() if not k.startswith("_")}
            key = step_key(parent.cache_key, json.dumps(identity, sort_keys=True, default=str), public, platform)
            if keys_only:
                return _config_only(step, parent, local).evolve(cache_key=key)
            record = cache.lookup(key, stage=stage, name=ctx.vertex.name)
            if record is not None:
                ctx.cached = True
                return record.apply(parent).evolve(cache_key=key)
            reason = cache.miss(
                key, parent.cache_key, stage=stage, name=ctx.vertex.name, instruction=shown, inputs=step_inputs
            )
            if reason and not reason.startswith(("first build", "--no-cache", "parent step missed")):
                ctx.log(f"cache miss: {reason}")
            if src_state is not None and isinstance(step, S.CopyStep):  # read only on a miss: a hit needs no files
                local.sources[step.source_key] = self._view(src_state, _source_name(step.source_key), cache)
            started = time.monotonic()
            result: ImageState = step.execute(parent, local)
            cache.put(delta(key, parent.cache_key, shown, step_inputs, parent, result, time.monotonic() - started))
            return result.evolve(cache_key=key)

        return run


def _config_only(step: Any, parent: ImageState, ws: S.Workspace) -> ImageState:
    """What a step does to the config, for a key computation: the later steps' keys read ENV, WORKDIR and USER
    from it; file system steps leave it as it was (their history entries do not matter to any key)."""
    if isinstance(step, S.WorkdirStep):
        return parent.with_config(WorkingDir=step.target(parent))
    if isinstance(step, S.CopyStep | RunStep):
        return parent
    result: ImageState = step.execute(parent, ws)  # the other steps change the config only
    return result


def _without_onbuild(ctx: RunContext, inputs: list[Any]) -> ImageState:
    state: ImageState = inputs[0]
    return state.with_config(OnBuild=None)


def _const(state: ImageState) -> Callable[[RunContext, list[Any]], ImageState]:
    def run(ctx: RunContext, inputs: list[Any]) -> ImageState:
        return state

    return run


def _image_state(resolved: ResolvedImage) -> ImageState:
    manifest, cfg = resolved.manifest, resolved.config
    if len(manifest.layers) != len(cfg.diff_ids):
        raise BuildError(
            f"image {resolved.name} is inconsistent: {len(manifest.layers)} layers but {len(cfg.diff_ids)} diff_ids"
        )
    layers = [Layer(d, diff) for d, diff in zip(manifest.layers, cfg.diff_ids, strict=True)]
    state = ImageState.from_image(cfg, layers, resolved.name, resolved.digest.value)
    return state.evolve(cache_key=base_key(resolved.digest.value, str(cfg.platform)))


def _source_name(key: str) -> str:
    kind, _, ref = key.partition(":")
    return f'stage "{ref}"' if kind == "stage" else f"image {ref}"


def _display(instr: Instruction) -> str:
    """The instruction as progress, cache records and reports show it (URL credentials redacted)."""
    from imgci.build.urls import redact_urls

    text = redact_urls(" ".join(instr.original.split()))
    return text if len(text) <= 200 else text[:197] + "..."
