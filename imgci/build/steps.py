"""One small class per Dockerfile instruction, each with two methods (STYLE.md rule 1):

- ``cache_input(state, ws) -> dict``: exactly what the step's result depends on besides its parent state
  (instruction text after expansion, content digests of the files it reads, the source stage's key) — the build
  cache (and the solver's run-once identity) is keyed on it;
- ``execute(state, ws) -> ImageState``: the new image state. Metadata steps only change the config and add a
  history entry (``empty_layer``); COPY/ADD/WORKDIR write a layer through the layer store.

Instructions arrive already expanded by the dispatcher (``instr.expand(env)``); steps never look at ARG/ENV scope.
History ``created_by`` strings follow BuildKit's dockerfile2llb.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from imgci.build.copyperms import resolve_chown
from imgci.build.copyplan import CopyOptions, FromFS, Inline, Source, plan_copy
from imgci.build.dockerfile import (
    AddInstruction,
    ArgInstruction,
    CmdInstruction,
    CopyInstruction,
    EntrypointInstruction,
    EnvInstruction,
    ExposeInstruction,
    HealthcheckInstruction,
    Instruction,
    LabelInstruction,
    MaintainerInstruction,
    OnbuildInstruction,
    ShellInstruction,
    StopsignalInstruction,
    UserInstruction,
    VolumeInstruction,
    WorkdirInstruction,
)
from imgci.build.fs import LayerEntry, SourceFS
from imgci.build.image import ImageState, Layer
from imgci.errors import BuildError, ImgciError
from imgci.store import Store

DEFAULT_SHELL = ["/bin/sh", "-c"]


@dataclass
class Workspace:
    """What a running step may use. ``sources`` maps a COPY --from key to the SourceFS it reads."""

    store: Store
    layers: Any  # imgci.build.layerstore.LayerStore
    context: SourceFS | None
    created: str
    epoch: int | None
    compression: str
    scratch: Path
    view: Callable[[ImageState, str], SourceFS]  # a state's root file system
    sources: dict[str, SourceFS] = field(default_factory=dict)
    log: Callable[[str], None] = lambda line: None
    check: Callable[[], None] = lambda: None  # raises when the build was cancelled
    states: dict[str, ImageState] = field(default_factory=dict)  # RUN --mount from= sources
    sandbox: Callable[[], Any] = lambda: None  # the RUN sandbox (imgci.build.sandbox.launcher.Sandbox), made lazily
    secrets: dict[str, bytes] = field(default_factory=dict)  # --secret id -> value
    ssh: dict[str, str] = field(default_factory=dict)  # --ssh id -> agent socket path
    network: str = "default"  # --network: RUN's network unless the instruction sets one
    fetched: dict[str, Any] = field(default_factory=dict)  # ADD <url|git> fetched for the cache key, by source

    @property
    def state_dir(self) -> Path:
        return self.store.root


class Step(Protocol):
    instruction: Instruction

    def cache_input(self, state: ImageState, ws: Workspace) -> dict[str, Any]: ...

    def execute(self, state: ImageState, ws: Workspace) -> ImageState: ...


def _go_quote_list(items: list[str] | tuple[str, ...]) -> str:
    """Go's ``fmt.Sprintf("%q", []string{...})``: ``["a" "b"]`` — what BuildKit writes into history."""
    import json

    return "[" + " ".join(json.dumps(i) for i in items) + "]"


# -- metadata steps ------------------------------------------------------------------------------------------
@dataclass
class MetadataStep:
    """Base for instructions that change only the image config."""

    instruction: Instruction
    keyword: ClassVar[str] = ""

    def cache_input(self, state: ImageState, ws: Workspace) -> dict[str, Any]:
        return {"instruction": self.history_text()}

    def history_text(self) -> str:
        return self.instruction.original

    def apply(self, state: ImageState) -> ImageState:
        raise NotImplementedError

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        return self.apply(state).with_history(self.history_text(), empty_layer=True, created=ws.created)


class EnvStep(MetadataStep):
    instruction: EnvInstruction

    def history_text(self) -> str:
        return "ENV " + " ".join(f"{k}={v}" for k, v in self.instruction.pairs)

    def apply(self, state: ImageState) -> ImageState:
        env = state.env
        for key, value in self.instruction.pairs:
            names = [e.partition("=")[0] for e in env]
            if key in names:  # an override keeps the variable's position, as BuildKit does
                env[names.index(key)] = f"{key}={value}"
            else:
                env.append(f"{key}={value}")
        return state.with_config(Env=env)


class ArgStep(MetadataStep):
    """ARG only records history; its value lives in the dispatcher's scope, never in the config."""

    instruction: ArgInstruction

    def __init__(self, instruction: ArgInstruction, bindings: list[tuple[str, str | None]]) -> None:
        self.instruction = instruction
        self.bindings = bindings

    def history_text(self) -> str:
        return "ARG " + " ".join(f"{n}={v}" if v is not None else n for n, v in self.bindings)

    def apply(self, state: ImageState) -> ImageState:
        return state


class LabelStep(MetadataStep):
    instruction: LabelInstruction

    def history_text(self) -> str:
        return "LABEL " + " ".join(f"{k}={v}" for k, v in self.instruction.pairs)

    def apply(self, state: ImageState) -> ImageState:
        labels = dict(state.config.get("Labels") or {})
        labels.update(dict(self.instruction.pairs))
        return state.with_config(Labels=labels)


class ExposeStep(MetadataStep):
    instruction: ExposeInstruction

    def history_text(self) -> str:
        return "EXPOSE " + " ".join(self.instruction.port_specs())

    def apply(self, state: ImageState) -> ImageState:
        ports = dict(state.config.get("ExposedPorts") or {})
        for p in self.instruction.port_specs():
            ports[p] = {}
        return state.with_config(ExposedPorts=ports)


class VolumeStep(MetadataStep):
    instruction: VolumeInstruction

    def history_text(self) -> str:
        return "VOLUME " + "[" + " ".join(self.instruction.volumes) + "]"

    def apply(self, state: ImageState) -> ImageState:
        volumes = dict(state.config.get("Volumes") or {})
        for v in self.instruction.volumes:
            if not v.strip():
                raise BuildError("VOLUME specified can not be an empty string", **_where(self.instruction))
            volumes[v] = {}
        return state.with_config(Volumes=volumes)


class UserStep(MetadataStep):
    instruction: UserInstruction

    def history_text(self) -> str:
        return "USER " + self.instruction.user

    def apply(self, state: ImageState) -> ImageState:
        return state.with_config(User=self.instruction.user)


class ShellStep(MetadataStep):
    instruction: ShellInstruction

    def history_text(self) -> str:
        return "SHELL [" + " ".join(self.instruction.shell) + "]"

    def apply(self, state: ImageState) -> ImageState:
        return state.with_config(Shell=list(self.instruction.shell))


def _command(state: ImageState, args: tuple[str, ...], prepend_shell: bool) -> list[str]:
    if not prepend_shell:
        return list(args)
    shell = list(state.config.get("Shell") or DEFAULT_SHELL)
    return [*shell, " ".join(args)]


class CmdStep(MetadataStep):
    instruction: CmdInstruction

    def apply(self, state: ImageState) -> ImageState:
        self._cmd = _command(state, self.instruction.args, self.instruction.prepend_shell)
        return state.with_config(Cmd=self._cmd)

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        new = self.apply(state)
        return new.with_history("CMD " + _go_quote_list(self._cmd), empty_layer=True, created=ws.created)


class EntrypointStep(MetadataStep):
    """ENTRYPOINT; ``cmd_set`` tells whether this stage set CMD before (else an inherited CMD is reset)."""

    instruction: EntrypointInstruction

    def __init__(self, instruction: EntrypointInstruction, cmd_set: bool) -> None:
        self.instruction = instruction
        self.cmd_set = cmd_set

    def cache_input(self, state: ImageState, ws: Workspace) -> dict[str, Any]:
        return {"instruction": self.instruction.original, "cmd_set": self.cmd_set}

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        args = self.instruction.args
        entry = _command(state, args, self.instruction.prepend_shell) if args is not None else None
        new = state.with_config(Entrypoint=entry or None)
        if not self.cmd_set:
            new = new.with_config(Cmd=None)
        text = "ENTRYPOINT " + _go_quote_list(entry or [])
        return new.with_history(text, empty_layer=True, created=ws.created)


class StopsignalStep(MetadataStep):
    instruction: StopsignalInstruction

    def history_text(self) -> str:
        return "STOPSIGNAL " + self.instruction.signal

    def apply(self, state: ImageState) -> ImageState:
        return state.with_config(StopSignal=self.instruction.signal)


class HealthcheckStep(MetadataStep):
    instruction: HealthcheckInstruction

    def healthcheck(self) -> dict[str, Any]:
        i = self.instruction
        hc: dict[str, Any] = {"Test": list(i.test)}
        for key, value in (
            ("Interval", i.interval),
            ("Timeout", i.timeout),
            ("StartPeriod", i.start_period),
            ("StartInterval", i.start_interval),
            ("Retries", i.retries),
        ):
            if value:
                hc[key] = value
        return hc

    def history_text(self) -> str:
        return self.instruction.original

    def apply(self, state: ImageState) -> ImageState:
        return state.with_config(Healthcheck=self.healthcheck())


class OnbuildStep(MetadataStep):
    instruction: OnbuildInstruction

    def history_text(self) -> str:
        return "ONBUILD " + self.instruction.expression

    def apply(self, state: ImageState) -> ImageState:
        triggers = list(state.config.get("OnBuild") or [])
        return state.with_config(OnBuild=[*triggers, self.instruction.expression])

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        return self.apply(state)  # BuildKit records no history entry for ONBUILD


class MaintainerStep(MetadataStep):
    instruction: MaintainerInstruction

    def history_text(self) -> str:
        return "MAINTAINER " + self.instruction.maintainer

    def apply(self, state: ImageState) -> ImageState:
        return state.evolve(base_extra={**state.base_extra, "author": self.instruction.maintainer})


def _where(instr: Instruction) -> dict[str, Any]:
    return {"file": instr.location.file, "line": instr.location.start}


# -- file system steps ---------------------------------------------------------------------------------------
def _write(state: ImageState, ws: Workspace, entries: list[LayerEntry], created_by: str) -> ImageState:
    result, _path = ws.layers.write_layer(entries, compression=ws.compression, source_date_epoch=ws.epoch)
    layer = Layer(result.descriptor, result.diff_id)
    return state.with_layer(layer).with_history(created_by, empty_layer=False, created=ws.created)


@dataclass
class WorkdirStep:
    """WORKDIR sets the config and creates the directory (a layer) when it does not exist yet, as BuildKit does."""

    instruction: WorkdirInstruction

    def target(self, state: ImageState) -> str:
        import posixpath

        path = self.instruction.path
        full = path if path.startswith("/") else posixpath.join(state.workdir, path)
        return posixpath.normpath(full) if full != "/" else "/"

    def cache_input(self, state: ImageState, ws: Workspace) -> dict[str, Any]:
        return {"instruction": "WORKDIR " + self.target(state), "user": state.user}

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        target = self.target(state)
        new = state.with_config(WorkingDir=target)
        text = "WORKDIR " + target
        rel = target.strip("/")
        if not rel:
            return new.with_history(text, empty_layer=True, created=ws.created)
        view = ws.view(state, "the image")
        real = view.resolve(rel)
        if real is not None and (info := view.lstat(real)) is not None and info.type == "dir":
            return _write(new, ws, [], text)  # BuildKit commits a layer for every WORKDIR, empty when it exists
        owner = (0, 0)
        if state.user:
            try:
                owner = resolve_chown(state.user, view)
            except ImgciError:
                owner = (0, 0)
        entries = plan_copy(
            [Inline(".imgci-workdir", b"")],
            "/" + rel + "/",
            dest_fs=view,
            options=CopyOptions(chown=owner, timestamp=ws.epoch, instruction="WORKDIR"),
        )
        entries = [e for e in entries if not e.info.path.endswith(".imgci-workdir")]
        return _write(new, ws, entries, text)


@dataclass
class CopyStep:
    """COPY and ADD. ``source_key`` names the --from source in ``Workspace.sources`` ("" = build context)."""

    instruction: CopyInstruction | AddInstruction
    source_key: str = ""
    source_identity: str = ""  # what --from resolved to (stage vertex key or image digest) for the cache key

    def _src(self, ws: Workspace) -> SourceFS:
        src = ws.sources.get(self.source_key) if self.source_key else ws.context
        if src is None:
            raise BuildError("no build context for COPY/ADD", **_where(self.instruction))
        return src

    def cache_input(self, state: ImageState, ws: Workspace) -> dict[str, Any]:
        """The instruction, what --from resolved to, WORKDIR, and the content digest of the context files read."""
        from imgci.build.copyplan import source_digest
        from imgci.build.urls import redact_url, redact_urls

        i = self.instruction
        # URL credentials stay out of the inputs (cache records are exported): what a URL served is the key
        inputs: dict[str, Any] = {
            "instruction": redact_urls(i.original),
            "from": self.source_identity,
            "workdir": state.workdir,
        }
        if isinstance(i, AddInstruction):
            remote = {redact_url(s): _fetch_remote(s, ws, i) for s in i.sources if "://" in s or s.startswith("git@")}
            if remote:
                inputs["remote"] = remote  # what the URL served / the commit a git ref resolved to, as BuildKit
        local = [s for s in i.sources if "://" not in s and not s.startswith("git@")]
        if not self.source_key and ws.context is not None and local:
            options = CopyOptions(excludes=tuple(i.excludes), parents=bool(getattr(i, "parents", False)))
            files: dict[str, str] = {}
            inputs["sources"] = source_digest(local, src_fs=ws.context, options=options, files=files)
            inputs["_files"] = files  # not part of the key: explains which file changed
        return inputs

    def execute(self, state: ImageState, ws: Workspace) -> ImageState:
        i = self.instruction
        is_add = isinstance(i, AddInstruction)
        view = ws.view(state, "the image")
        try:
            chown = resolve_chown(i.chown, view) if i.chown else None
            scratch = Path(tempfile.mkdtemp(prefix="copy-", dir=ws.scratch))
            try:
                sources: list[Source] = [Inline(c.path, c.data.encode()) for c in i.contents]
                src_fs = self._src(ws)
                for s in i.sources:
                    sources.append(_add_source(s, scratch, i, ws.fetched) if is_add else s)
                options = CopyOptions(
                    chown=chown,
                    chmod=i.chmod,
                    excludes=tuple(i.excludes),
                    parents=bool(getattr(i, "parents", False)),
                    link=i.link,
                    unpack=is_add and getattr(i, "unpack", None) is not False,
                    timestamp=ws.epoch,
                    instruction=i.keyword,
                )
                entries = plan_copy(
                    sources,
                    i.dest,
                    src_fs=src_fs,
                    dest_fs=view,
                    workdir=state.workdir,
                    options=options,
                    scratch=scratch,
                )
                return _write(state, ws, entries, _copy_history(i))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        except BuildError as e:
            if e.line:
                raise
            raise BuildError(e.detail, hint=e.hint, **_where(i)) from None


def _copy_history(i: CopyInstruction | AddInstruction) -> str:
    """The history entry, without the credentials of ``ADD http://user:password@host/…``."""
    from imgci.build.urls import redact_urls

    text = i.original
    if text.upper().startswith(("COPY ", "ADD ")):
        return redact_urls(f"{text} # buildkit")
    return redact_urls(f"{i.keyword} {' '.join(i.sources)} {i.dest} # buildkit")


def _fetch_remote(src: str, ws: Workspace, i: AddInstruction) -> str:
    """Fetch an ADD source once per build (kept in ``ws.fetched`` for execute) and say what it is by content."""
    from imgci.build import remote

    got: Any = ws.fetched.get(src)
    kind = remote.classify(src)
    if got is None:
        dest = Path(tempfile.mkdtemp(prefix="fetch-", dir=ws.scratch))
        if kind == "http":
            got = remote.fetch_url(src, dest_dir=dest, checksum=getattr(i, "checksum", None))
        elif kind == "git":
            got = remote.clone_git(src, dest_dir=dest, keep_git_dir=getattr(i, "keep_git_dir", None))
        else:
            return ""
        ws.fetched[src] = got
    if kind == "http":
        return f"{got.digest} {got.last_modified}"
    return f"git {got.commit} {got.subdir}"


def _add_source(
    src: str, scratch: Path, i: CopyInstruction | AddInstruction, fetched: dict[str, Any] | None = None
) -> Source:
    from imgci.build import remote

    kind = remote.classify(src)
    got = (fetched or {}).get(src)
    if kind == "http":
        download = (
            got if got is not None else remote.fetch_url(src, dest_dir=scratch, checksum=getattr(i, "checksum", None))
        )
        if download.last_modified is None:  # no Last-Modified: BuildKit (and buildah) use mtime 0
            import os

            os.utime(download.path, (0, 0))
        return FromFS(download.fs(), download.filename, unpack=False)
    if kind == "git":
        checkout = (
            got
            if got is not None
            else remote.clone_git(src, dest_dir=scratch, keep_git_dir=getattr(i, "keep_git_dir", None))
        )
        return FromFS(checkout.fs(), "", unpack=False)
    return src
