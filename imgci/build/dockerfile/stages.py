"""The parsed Dockerfile, its stages, stage resolution and ARG scoping (BuildKit dockerfile2llb semantics).

Contract: :func:`parse_dockerfile` parses and checks a whole file. :func:`stages_needed` answers which stages a
target needs, in dispatch order, after BuildKit's checks (unknown target, variables in ``--from``, stage index out
of range, cycles, a stage copying from a stage defined after it). :class:`ArgScope` evaluates ARG values.

How the dispatcher uses ARG/ENV scoping and expansion (this is BuildKit's model):

1. ``scope = ArgScope(dockerfile, build_args, predefined_args(target_platform, build_platform))``.
   ``scope.global_values`` is the global scope: the predefined platform ARGs (a build arg of the same name
   overrides them), then each ARG before the first FROM in order (a build arg wins over the default; defaults are
   expanded with the global scope so far). Only FROM sees it directly: ``stage.from_.expand(scope.global_values)``.
2. Per stage, keep ``env`` = the base image's config Env (with ``PATH`` added when missing), then walk
   ``stage.instructions`` in order:

   - ``ArgInstruction``: ``for b in scope.declare(instr, env)``: if ``b.value is not None`` set ``env[b.name]``.
     A declared ARG takes the build arg if one is given, else its default expanded with ``env``, else — when it
     has no default — the global scope's value (``ARG TARGETARCH``, or a global ``ARG VERSION=1`` redeclared as
     ``ARG VERSION``). Undeclared build args are not visible. ARG values are in ``env`` for expansion and for
     RUN's environment but never in the image config; record the bindings in order (RUN's history line and cache
     key use them: ``|2 A=1 B=2 /bin/sh -c ...``).
   - everything else: ``instr = instr.expand(env)`` (a no-op for the instructions BuildKit does not expand), then
     apply it; ``ENV k=v`` sets ``env[k]`` *and* the image config Env. Later ENV/ARG of the same name overwrite
     earlier ones in ``env`` (it is one map, as BuildKit's state env is).
3. RUN additionally gets :func:`proxy_env` (``HTTP_PROXY``… from build args, usable without ARG and kept out of
   history and cache keys unless the Dockerfile declares them with ARG).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from imgci.build.dockerfile.instructions import (
    ArgInstruction,
    CopyInstruction,
    FromInstruction,
    Instruction,
    MaintainerInstruction,
    RunInstruction,
)
from imgci.build.dockerfile.lexer import parse_nodes
from imgci.build.dockerfile.parse import parse_instruction
from imgci.build.dockerfile.shell import ShellError, ShellLexer
from imgci.errors import DockerfileError
from imgci.oci import Platform

PROXY_ARGS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
)
PLATFORM_ARGS = (
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
)


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` and the instructions after it. ``name`` is lower-cased (None when unnamed)."""

    index: int
    name: str | None
    from_: FromInstruction
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        """The name BuildKit uses in messages: the stage name or ``stage-<index>``."""
        return self.name or f"stage-{self.index}"


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile. ``directives`` maps ``syntax``/``escape``/``check`` to their values; ``notes`` are
    things the user should know that are not errors (ignored directives, deprecated syntax)."""

    filename: str
    directives: dict[str, str]
    notes: list[str]
    escape: str
    global_args: list[ArgInstruction]
    stages: list[Stage]

    def stage(self, name_or_index: str | int) -> Stage | None:
        """The stage with that index (an int or a decimal string) or name (case-insensitive; the last stage
        of that name, as BuildKit), or None."""
        if isinstance(name_or_index, int) or re.fullmatch(r"[+-]?[0-9]+", name_or_index):
            index = int(name_or_index)
            return self.stages[index] if 0 <= index < len(self.stages) else None
        wanted = name_or_index.lower()
        return next((s for s in reversed(self.stages) if s.name == wanted), None)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def error(self, message: str, line: int = 0) -> DockerfileError:
        return DockerfileError(message, file=self.filename, line=line)


def parse_dockerfile(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile; raises DockerfileError (with the line) for anything BuildKit rejects when parsing."""
    if not text:
        raise DockerfileError("the Dockerfile cannot be empty", file=filename)
    parsed = parse_nodes(text, filename)
    if not parsed.nodes:
        raise DockerfileError("file with no instructions", file=filename)
    notes: list[str] = []
    if "syntax" in parsed.directives:
        notes.append(
            f"line {parsed.directive_lines['syntax']}: # syntax={parsed.directives['syntax']} is not fetched: "
            "imgci parses the Dockerfile itself (BuildKit dockerfile 1.x syntax)"
        )
    if "check" in parsed.directives:
        notes.append(f"line {parsed.directive_lines['check']}: # check= is ignored: imgci runs no build checks")
    notes += parsed.warnings
    global_args: list[ArgInstruction] = []
    stages: list[Stage] = []
    for node in parsed.nodes:
        instruction = parse_instruction(node, filename, parsed.escape)
        if isinstance(instruction, FromInstruction):
            stages.append(Stage(len(stages), instruction.name, instruction))
        elif not stages and isinstance(instruction, ArgInstruction):
            global_args.append(instruction)
        elif not stages:
            raise DockerfileError("no build stage in current context", file=filename, line=node.start)
        else:
            if isinstance(instruction, MaintainerInstruction):
                notes.append(f"line {node.start}: MAINTAINER is deprecated, use a LABEL instead")
            stages[-1].instructions.append(instruction)
    if not stages:
        raise DockerfileError("dockerfile contains no stages to build (no FROM)", file=filename)
    return Dockerfile(filename, parsed.directives, notes, parsed.escape, global_args, stages)


def parse_trigger(expression: str, at: FromInstruction) -> Instruction:
    """An ONBUILD trigger from a base image's config, parsed as BuildKit does when the stage starts: on its own
    (default escape), located at the stage's FROM line; it must be one instruction and not FROM."""
    parsed = parse_nodes(expression, at.location.file)
    if len(parsed.nodes) != 1:
        raise at.error(f"onbuild trigger should be a single expression: {expression!r}")
    node = parsed.nodes[0]
    node.start, node.end = at.location.start, at.location.end
    instruction = parse_instruction(node, at.location.file, parsed.escape)
    if isinstance(instruction, FromInstruction):
        raise at.error("FROM isn't allowed as an ONBUILD trigger")
    return instruction


def predefined_args(target: Platform, build: Platform) -> dict[str, str]:
    """BuildKit's automatic platform ARGs (global scope; a stage sees one only after ``ARG NAME``)."""
    t, b = target.normalized(), build.normalized()
    return {
        "BUILDPLATFORM": str(b),
        "BUILDOS": b.os,
        "BUILDARCH": b.architecture,
        "BUILDVARIANT": b.variant,
        "TARGETPLATFORM": str(t),
        "TARGETOS": t.os,
        "TARGETARCH": t.architecture,
        "TARGETVARIANT": t.variant,
    }


def proxy_env(build_args: Mapping[str, str]) -> dict[str, str]:
    """The proxy environment BuildKit gives RUN from build args (names matched case-insensitively; both spellings
    set). These are not part of history or cache keys unless declared with ARG."""
    env: dict[str, str] = {}
    for key in sorted(build_args):
        lower = key.lower()
        if lower in ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"):
            env[lower.upper()] = env[lower] = build_args[key]
    return env


class ArgBinding(NamedTuple):
    name: str
    value: str | None  # None: declared without any value; ``$NAME`` then expands to "" (unset)


class ArgScope:
    """ARG evaluation for one build (see the module docstring for how the dispatcher uses it)."""

    def __init__(
        self,
        dockerfile: Dockerfile,
        build_args: Mapping[str, str] | None = None,
        predefined: Mapping[str, str] | None = None,
    ) -> None:
        self.dockerfile = dockerfile
        self.build_args = dict(build_args or {})
        if predefined is None:
            predefined = predefined_args(Platform.host(), Platform.host())
        values = {k: self.build_args.get(k, v) for k, v in predefined.items()}
        for instruction in dockerfile.global_args:
            for binding in self.declare(instruction, values, global_scope=True):
                if binding.value is not None:
                    values[binding.name] = binding.value
        self.global_values = values

    def declare(
        self, instruction: ArgInstruction, env: Mapping[str, str], *, global_scope: bool = False
    ) -> list[ArgBinding]:
        """The values an ARG instruction binds, in order; each default is expanded with ``env`` plus the
        bindings before it on the same line."""
        current = dict(env)
        bindings = []
        for definition in instruction.args:
            value: str | None = None
            if definition.name in self.build_args:
                value = self.build_args[definition.name]
            elif definition.default is not None:
                try:
                    value = ShellLexer(self.dockerfile.escape).process(definition.default, current)[0]
                except ShellError as e:
                    raise instruction.error(str(e)) from None
            elif not global_scope and definition.name in self.global_values:
                value = self.global_values[definition.name]
            if value is not None:
                current[definition.name] = value
            bindings.append(ArgBinding(definition.name, value))
        return bindings


class StageDependency(NamedTuple):
    """What a stage reads: ``("stage", index)``, ``("image", reference)`` or ``("scratch", "scratch")``."""

    kind: Literal["stage", "image", "scratch"]
    ref: int | str


def _by_name(dockerfile: Dockerfile, name: str, before: int | None = None) -> StageDependency:
    stages = dockerfile.stages if before is None else dockerfile.stages[:before]
    for stage in reversed(stages):
        if stage.name is not None and stage.name == (name.lower() if before is None else name):
            return StageDependency("stage", stage.index)
    return StageDependency("scratch", "scratch") if name == "scratch" else StageDependency("image", name)


def resolve_copy_from(dockerfile: Dockerfile, instruction: CopyInstruction) -> StageDependency | None:
    """What ``COPY --from=X`` reads (None without --from): a stage index, a stage name (case-insensitive), else an
    image. Raises DockerfileError for variables in X (BuildKit does not expand --from) and bad indices."""
    value = instruction.from_
    if value is None:
        return None
    try:
        processed = ShellLexer(dockerfile.escape).process(value, {})[0]
    except ShellError as e:
        raise instruction.error(str(e)) from None
    if processed != value:
        raise instruction.error(
            "variable expansion is not supported for --from, define a new stage with FROM using ARG from global "
            "scope as a workaround"
        )
    if re.fullmatch(r"[+-]?[0-9]+", value):
        index = int(value)
        if not 0 <= index < len(dockerfile.stages):
            raise instruction.error(f"invalid stage index {index} (the Dockerfile has {len(dockerfile.stages)} stages)")
        return StageDependency("stage", index)
    return _by_name(dockerfile, value)


def resolve_mount_from(dockerfile: Dockerfile, value: str) -> StageDependency:
    """What ``RUN --mount=…,from=X`` reads: a stage by name, else an image (as BuildKit resolves it)."""
    return _by_name(dockerfile, value)


def _edges(dockerfile: Dockerfile, stage: Stage) -> list[tuple[StageDependency, Instruction]]:
    """COPY --from and RUN --mount from= dependencies of a stage, in instruction order."""
    edges: list[tuple[StageDependency, Instruction]] = []
    for instruction in stage.instructions:
        if isinstance(instruction, CopyInstruction):
            dep = resolve_copy_from(dockerfile, instruction)
            if dep is not None:
                edges.append((dep, instruction))
        elif isinstance(instruction, RunInstruction):
            for options in instruction.mount_options:
                if options.get("from"):
                    edges.append((_by_name(dockerfile, options["from"]), instruction))
    return edges


def base_of(dockerfile: Dockerfile, stage: Stage, global_values: Mapping[str, str]) -> StageDependency:
    """What FROM starts from: an *earlier* stage whose name equals the expanded image exactly (BuildKit's rule: a
    FROM naming the stage itself or a later stage is an image reference), ``scratch``, or an image."""
    image = stage.from_.expand(global_values).image
    return _by_name(dockerfile, image, before=stage.index)


def stage_dependencies(
    dockerfile: Dockerfile, stage: Stage, env_for_expansion: Mapping[str, str]
) -> list[StageDependency]:
    """FROM's base, then every ``COPY --from`` / ``RUN --mount from=`` in order. ``env_for_expansion`` is the
    global ARG scope (``ArgScope.global_values``), used for FROM."""
    return [base_of(dockerfile, stage, env_for_expansion), *(dep for dep, _ in _edges(dockerfile, stage))]


def stages_needed(
    dockerfile: Dockerfile,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    *,
    predefined: Mapping[str, str] | None = None,
) -> list[int]:
    """Indices of the stages ``target`` (a stage name; default: the last stage) transitively needs, ascending —
    the order BuildKit dispatches them in. ``predefined`` defaults to the host platform's ``predefined_args``."""
    if target is None:
        wanted = dockerfile.stages[-1]
    else:
        found = next((s for s in reversed(dockerfile.stages) if s.name == target.lower()), None)
        if found is None:
            names = dockerfile.stage_names()
            hint = difflib.get_close_matches(target.lower(), names, n=1, cutoff=0.6)
            suggestion = f" (did you mean {hint[0]}?)" if hint else ""
            listing = ", ".join(names) if names else "none of the stages is named"
            raise dockerfile.error(f'target stage "{target}" could not be found{suggestion}; stages: {listing}')
        wanted = found
    scope = ArgScope(dockerfile, build_args, predefined)
    bases = {s.index: base_of(dockerfile, s, scope.global_values) for s in dockerfile.stages}
    edges = {s.index: _edges(dockerfile, s) for s in dockerfile.stages}
    _check_cycles(dockerfile, edges)
    needed: set[int] = set()
    pending = [wanted.index]
    while pending:
        index = pending.pop()
        if index in needed:
            continue
        needed.add(index)
        refs = [bases[index]] + [dep for dep, _ in edges[index]]
        pending += [int(dep.ref) for dep in refs if dep.kind == "stage"]
    for index in sorted(needed):
        stage = dockerfile.stages[index]
        for dep, instruction in edges[index]:
            if dep.kind == "stage" and int(dep.ref) > index:
                later = dockerfile.stages[int(dep.ref)].display_name
                raise instruction.error(
                    f'cannot copy from stage "{later}", it needs to be defined before current stage '
                    f'"{stage.display_name}"'
                )
    return sorted(needed)


def _check_cycles(dockerfile: Dockerfile, edges: dict[int, list[tuple[StageDependency, Instruction]]]) -> None:
    """BuildKit validateCircularDependency over COPY --from / RUN --mount edges of all stages."""
    visited: set[int] = set()
    on_path: list[int] = []

    def visit(index: int, via: list[Instruction]) -> tuple[list[int], list[Instruction]] | None:
        if index in visited:
            return None
        visited.add(index)
        on_path.append(index)
        for dep, instruction in edges[index]:
            if dep.kind != "stage":
                continue
            target = int(dep.ref)
            if target in on_path:
                return [*on_path[on_path.index(target) :], target], [*via, instruction]
            found = visit(target, [*via, instruction])
            if found is not None:
                return found
        on_path.pop()
        return None

    for stage in dockerfile.stages:
        found = visit(stage.index, [])
        if found is not None:
            cycle, via = found
            names = " -> ".join(dockerfile.stages[i].display_name for i in cycle)
            first = via[len(via) - (len(cycle) - 1)]  # the edge that leaves the cycle's first stage
            raise first.error(
                f"circular dependency detected on stage: {dockerfile.stages[cycle[0]].display_name} ({names})"
            )
