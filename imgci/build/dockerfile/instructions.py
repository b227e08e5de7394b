"""Typed Dockerfile instructions and their variable expansion (BuildKit instructions/commands.go semantics).

Contract: every instruction is a frozen dataclass with ``keyword`` (canonical upper case), ``location`` (file,
1-based first line, last line), ``original`` (the instruction line as BuildKit keeps it: continuations joined,
comments dropped, trimmed, heredoc bodies not included) and ``escape`` (the file's escape character).
Parsed values are *as written*: quotes and escapes are still in them wherever BuildKit resolves them only when it
expands the instruction. ``expand(env)`` returns a copy with exactly the parts BuildKit expands substituted from
``env`` (the stage's current environment: see :mod:`imgci.build.dockerfile.stages`), raising DockerfileError at
the instruction's line. Instructions BuildKit does not expand (RUN's command, CMD, ENTRYPOINT, SHELL, HEALTHCHECK,
MAINTAINER, ONBUILD, and ARG, whose values :class:`~imgci.build.dockerfile.stages.ArgScope` evaluates) return self.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple, Self

from imgci.build.dockerfile.flags import check_signal, port_specs
from imgci.build.dockerfile.lineparse import Heredoc, maybe_heredoc
from imgci.build.dockerfile.mounts import parse_mount
from imgci.build.dockerfile.shell import ShellError, ShellLexer
from imgci.errors import DockerfileError, PlatformError
from imgci.oci import Platform


class Location(NamedTuple):
    file: str
    start: int  # 1-based first line
    end: int  # 1-based last line (the heredoc terminator when there is one)


class ArgDefinition(NamedTuple):
    name: str
    default: str | None  # as written; None for ``ARG NAME``


class InlineSource(NamedTuple):
    """A COPY/ADD source given as a heredoc: a file named ``path`` whose content is ``data`` (tabs already chomped
    for ``<<-``); ``expand`` says whether the body is subject to variable expansion (unquoted delimiter)."""

    path: str
    data: str
    expand: bool


class RunScript(NamedTuple):
    """What BuildKit executes for a RUN: ``args`` (prefix the stage's SHELL when ``prepend_shell``), plus a heredoc
    to provide as an executable file, ``(name, data)``, mounted read-only at ``/dev/pipes/<name>`` (mode 0755)."""

    args: tuple[str, ...]
    prepend_shell: bool
    pipe_file: tuple[str, str] | None


def chomp(text: str) -> str:
    """BuildKit ChompHeredocContent: leading tabs removed from every line (``<<-``)."""
    return re.sub(r"(?m)^\t+", "", text)


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """Base of every instruction (see the module docstring)."""

    keyword: ClassVar[str] = ""
    location: Location
    original: str
    escape: str = "\\"

    @property
    def line(self) -> int:
        return self.location.start

    def error(self, message: str) -> DockerfileError:
        return DockerfileError(message, file=self.location.file, line=self.location.start)

    def expand(self, env: Mapping[str, str]) -> Self:
        """A copy with the parts BuildKit substitutes expanded from ``env`` (this instruction: none)."""
        return self

    def _word(self, word: str, env: Mapping[str, str]) -> str:
        try:
            return ShellLexer(self.escape).process(word, env)[0]
        except ShellError as e:
            raise self.error(str(e)) from None

    def _words(self, word: str, env: Mapping[str, str]) -> list[str]:
        try:
            return ShellLexer(self.escape).process(word, env)[1]
        except ShellError as e:
            raise self.error(str(e)) from None

    def _optional(self, word: str | None, env: Mapping[str, str]) -> str | None:
        return None if word is None else (self._word(word, env) or None)


@dataclass(frozen=True, kw_only=True)
class FromInstruction(Instruction):
    """``FROM [--platform=P] image [AS name]``; ``name`` lower-cased. Expanded with the *global* ARG scope only."""

    keyword: ClassVar[str] = "FROM"
    image: str
    name: str | None = None
    platform: str | None = None

    def expand(self, env: Mapping[str, str]) -> Self:
        image = self._word(self.image, env)
        if not image:
            raise self.error(f"base name ({self.image}) should not be blank")
        platform = None
        if self.platform is not None:
            platform = self._word(self.platform, env)
            if not platform:
                raise self.error(f"empty platform value from expression {self.platform}")
            try:
                Platform.parse(platform)
            except PlatformError as e:
                raise self.error(f"failed to parse platform {self.platform}: {e}") from None
        return replace(self, image=image, platform=platform)


@dataclass(frozen=True, kw_only=True)
class ArgInstruction(Instruction):
    """``ARG name[=default] ...``. ``expand`` returns self: BuildKit evaluates ARG values through the build args,
    the global scope and the stage env (see ``ArgScope.declare``), not through the generic expander."""

    keyword: ClassVar[str] = "ARG"
    args: tuple[ArgDefinition, ...]


@dataclass(frozen=True, kw_only=True)
class EnvInstruction(Instruction):
    """``ENV k=v ...`` or the legacy ``ENV k v`` (``legacy`` True; the value is the rest of the line)."""

    keyword: ClassVar[str] = "ENV"
    pairs: tuple[tuple[str, str], ...]
    legacy: bool = False

    def expand(self, env: Mapping[str, str]) -> Self:
        return replace(self, pairs=tuple((self._word(k, env), self._word(v, env)) for k, v in self.pairs))


@dataclass(frozen=True, kw_only=True)
class LabelInstruction(Instruction):
    """``LABEL k=v ...`` or the legacy ``LABEL k v``."""

    keyword: ClassVar[str] = "LABEL"
    pairs: tuple[tuple[str, str], ...]
    legacy: bool = False

    def expand(self, env: Mapping[str, str]) -> Self:
        return replace(self, pairs=tuple((self._word(k, env), self._word(v, env)) for k, v in self.pairs))


@dataclass(frozen=True, kw_only=True)
class ExposeInstruction(Instruction):
    """``EXPOSE port[/proto] ...``; ``ports`` sorted as BuildKit sorts them at parse time. Expansion splits words
    (``ARG P="80 443"`` then ``EXPOSE $P`` exposes two ports) and validates the port specs."""

    keyword: ClassVar[str] = "EXPOSE"
    ports: tuple[str, ...]

    def expand(self, env: Mapping[str, str]) -> Self:
        ports = tuple(word for port in self.ports for word in self._words(port, env))
        expanded = replace(self, ports=ports)
        expanded.port_specs()
        return expanded

    def port_specs(self) -> list[str]:
        """The image config ExposedPorts keys, ``"80/tcp"``; ranges expanded (only meaningful after expand)."""
        try:
            return port_specs(list(self.ports))
        except ValueError as e:
            raise self.error(str(e)) from None


@dataclass(frozen=True, kw_only=True)
class VolumeInstruction(Instruction):
    keyword: ClassVar[str] = "VOLUME"
    volumes: tuple[str, ...]
    json: bool = False

    def expand(self, env: Mapping[str, str]) -> Self:
        volumes = tuple(self._word(v, env) for v in self.volumes)
        if "" in volumes:
            raise self.error("VOLUME specified can not be an empty string")
        return replace(self, volumes=volumes)


@dataclass(frozen=True, kw_only=True)
class UserInstruction(Instruction):
    keyword: ClassVar[str] = "USER"
    user: str

    def expand(self, env: Mapping[str, str]) -> Self:
        return replace(self, user=self._word(self.user, env))


@dataclass(frozen=True, kw_only=True)
class WorkdirInstruction(Instruction):
    """``WORKDIR path``: relative paths are resolved against the previous WORKDIR by the dispatcher."""

    keyword: ClassVar[str] = "WORKDIR"
    path: str

    def expand(self, env: Mapping[str, str]) -> Self:
        return replace(self, path=self._word(self.path, env))


@dataclass(frozen=True, kw_only=True)
class StopsignalInstruction(Instruction):
    keyword: ClassVar[str] = "STOPSIGNAL"
    signal: str

    def expand(self, env: Mapping[str, str]) -> Self:
        signal = self._word(self.signal, env)
        try:
            check_signal(signal)
        except ValueError as e:
            raise self.error(str(e)) from None
        return replace(self, signal=signal)


@dataclass(frozen=True, kw_only=True)
class MaintainerInstruction(Instruction):
    """Deprecated; sets the image ``author``."""

    keyword: ClassVar[str] = "MAINTAINER"
    maintainer: str


@dataclass(frozen=True, kw_only=True)
class ShellInstruction(Instruction):
    keyword: ClassVar[str] = "SHELL"
    shell: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CmdInstruction(Instruction):
    """Exec form: ``args`` as given, ``prepend_shell`` False. Shell form: one arg, the command text, and
    ``prepend_shell`` True (the dispatcher prefixes the current SHELL, default ``/bin/sh -c``)."""

    keyword: ClassVar[str] = "CMD"
    args: tuple[str, ...]
    prepend_shell: bool


@dataclass(frozen=True, kw_only=True)
class EntrypointInstruction(Instruction):
    """Like CMD; ``args`` is None for ``ENTRYPOINT []`` and a bare ``ENTRYPOINT`` (image Entrypoint null)."""

    keyword: ClassVar[str] = "ENTRYPOINT"
    args: tuple[str, ...] | None
    prepend_shell: bool


@dataclass(frozen=True, kw_only=True)
class HealthcheckInstruction(Instruction):
    """``test`` is ``("NONE",)``, ``("CMD", arg, ...)`` or ``("CMD-SHELL", command)``; durations in nanoseconds
    (0 = not set), as docker stores them in the image config."""

    keyword: ClassVar[str] = "HEALTHCHECK"
    test: tuple[str, ...]
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(frozen=True, kw_only=True)
class OnbuildInstruction(Instruction):
    """``ONBUILD <trigger>``: ``expression`` is what goes into the image config OnBuild list (heredocs appended),
    ``trigger`` the parsed instruction. Not expanded now: the trigger is expanded when it runs downstream."""

    keyword: ClassVar[str] = "ONBUILD"
    expression: str
    trigger: Instruction


@dataclass(frozen=True, kw_only=True)
class _SourcesInstruction(Instruction):
    sources: tuple[str, ...]  # paths (or URLs for ADD), as written
    dest: str
    contents: tuple[InlineSource, ...] = ()  # heredoc sources
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    excludes: tuple[str, ...] = ()
    json: bool = False

    def _expand_sources(self, env: Mapping[str, str]) -> Self:
        raw = ShellLexer("\\", skip_process_quotes=True)  # heredoc bodies: BuildKit always uses \\ here
        try:
            contents = tuple(c._replace(data=raw.process(c.data, env)[0]) if c.expand else c for c in self.contents)
        except ShellError as e:
            raise self.error(str(e)) from None
        return replace(
            self,
            sources=tuple(self._word(s, env) for s in self.sources),
            dest=self._word(self.dest, env),
            contents=contents,
            chown=self._optional(self.chown, env),
            chmod=self._optional(self.chmod, env),
        )


@dataclass(frozen=True, kw_only=True)
class CopyInstruction(_SourcesInstruction):
    """``COPY [--from --chown --chmod --link --parents --exclude...] src... dest``. Each source is one word even
    after expansion. ``from_`` is never expanded (BuildKit rejects variables in it)."""

    keyword: ClassVar[str] = "COPY"
    from_: str | None = None
    parents: bool = False

    def expand(self, env: Mapping[str, str]) -> Self:
        return self._expand_sources(env)


@dataclass(frozen=True, kw_only=True)
class AddInstruction(_SourcesInstruction):
    """``ADD [--chown --chmod --link --exclude... --checksum --keep-git-dir --unpack] src... dest``;
    ``keep_git_dir``/``unpack`` are None when not given."""

    keyword: ClassVar[str] = "ADD"
    checksum: str | None = None
    keep_git_dir: bool | None = None
    unpack: bool | None = None

    def expand(self, env: Mapping[str, str]) -> Self:
        return replace(self._expand_sources(env), checksum=self._optional(self.checksum, env))


@dataclass(frozen=True, kw_only=True)
class RunInstruction(Instruction):
    """``RUN [--mount=...]... [--network=default|none|host] [--security=sandbox|insecure] command``.

    ``args``/``prepend_shell`` as for CMD; ``heredocs`` are passed to the shell unexpanded (see :meth:`script`).
    ``mounts`` are the raw ``--mount`` values; ``mount_options`` the same parsed into dicts (see
    ``flags.parse_mount``): values as written until :meth:`expand`, which expands and validates them.
    """

    keyword: ClassVar[str] = "RUN"
    args: tuple[str, ...]
    prepend_shell: bool
    heredocs: tuple[Heredoc, ...] = ()
    mounts: tuple[str, ...] = ()
    mount_options: tuple[dict[str, str], ...] = field(default=())
    network: str = "default"
    security: str = "sandbox"

    def expand(self, env: Mapping[str, str]) -> Self:
        try:
            options = tuple(parse_mount(m, lambda word: self._word(word, env)) for m in self.mounts)
        except ValueError as e:
            raise self.error(str(e)) from None
        return replace(self, mount_options=options)

    def script(self, *, windows: bool = False) -> RunScript:
        """The command BuildKit runs, heredocs resolved: a lone ``<<EOF`` runs the body (as an executable file
        when it starts with ``#!``), otherwise the heredocs are appended to the command for the shell to read."""
        if not self.heredocs:
            return RunScript(self.args, self.prepend_shell, None)
        if len(self.args) != 1 or not self.prepend_shell:
            raise self.error(f"parsing produced an invalid run command: {list(self.args)}")
        if maybe_heredoc(self.args[0]) is None:
            text = self.args[0] + "".join("\n" + h.content + h.name for h in self.heredocs)
            return RunScript((text,), True, None)
        first = self.heredocs[0]
        data = chomp(first.content) if first.chomp else first.content
        if not windows and data.startswith("#!"):
            path = posixpath.normpath(posixpath.join("/dev/pipes/", first.name))
            return RunScript((path,), True, (first.name, data))
        return RunScript((data,), True, None)
