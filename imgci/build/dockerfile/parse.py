"""Instruction-level parsing: a lexer :class:`~imgci.build.dockerfile.lexer.Node` → a typed instruction, with
BuildKit's argument checks, flags and error messages (frontend/dockerfile/instructions/parse.go).

Contract: :func:`parse_instruction` returns the typed instruction or raises DockerfileError at the node's first
line; unknown instructions get a "did you mean X?" suggestion.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import TypedDict

from imgci.build.dockerfile.flags import Flags, parse_go_int32, parse_interval
from imgci.build.dockerfile.instructions import (
    AddInstruction,
    ArgDefinition,
    ArgInstruction,
    CmdInstruction,
    CopyInstruction,
    EntrypointInstruction,
    EnvInstruction,
    ExposeInstruction,
    FromInstruction,
    HealthcheckInstruction,
    InlineSource,
    Instruction,
    LabelInstruction,
    Location,
    MaintainerInstruction,
    OnbuildInstruction,
    RunInstruction,
    ShellInstruction,
    StopsignalInstruction,
    UserInstruction,
    VolumeInstruction,
    WorkdirInstruction,
    chomp,
)
from imgci.build.dockerfile.lineparse import Node, maybe_heredoc, strip_ws
from imgci.build.dockerfile.mounts import parse_mount
from imgci.errors import DockerfileError

_STAGE_NAME = re.compile(r"[a-z][a-z0-9-_.]*")


class _Common(TypedDict):
    location: Location
    original: str
    escape: str


class _SourceFields(TypedDict):
    sources: tuple[str, ...]
    dest: str
    contents: tuple[InlineSource, ...]
    chown: str | None
    chmod: str | None
    link: bool
    excludes: tuple[str, ...]
    json: bool


class _Request:
    """What one instruction parser needs: the node, its location and flags, and the common errors."""

    def __init__(self, node: Node, filename: str, escape: str) -> None:
        self.node = node
        self.args = node.args
        self.flags = Flags(node.flags)
        self.escape = escape
        self.location = Location(filename, node.start, node.end)
        self.base = _Common(location=self.location, original=strip_ws(node.original), escape=escape)

    def parse_flags(self) -> None:
        try:
            self.flags.parse()
        except ValueError as e:
            raise Problem(str(e)) from None

    def exactly_one(self, keyword: str) -> str:
        if len(self.args) != 1:
            raise Problem(f"{keyword} requires exactly one argument")
        return self.args[0]

    def at_least_one(self, keyword: str) -> None:
        if not self.args:
            raise Problem(f"{keyword} requires at least one argument")

    def command_args(self) -> tuple[str, ...]:
        """BuildKit handleJSONArgs: JSON args as given, shell form as one string."""
        if not self.args:
            return ()
        return tuple(self.args) if self.node.json else (" ".join(self.args),)


class Problem(Exception):
    """An instruction-level error; becomes a DockerfileError at the node's line."""


def parse_instruction(node: Node, filename: str, escape: str) -> Instruction:
    """The typed instruction for ``node`` (see the module docstring)."""
    parser = _PARSERS.get(node.keyword.lower())
    if parser is None:
        upper = node.keyword.upper()
        hint = difflib.get_close_matches(upper, KEYWORDS, n=1, cutoff=0.6)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise DockerfileError(f"unknown instruction: {upper}{suggestion}", file=filename, line=node.start)
    try:
        return parser(_Request(node, filename, escape))
    except Problem as e:
        raise DockerfileError(str(e), file=filename, line=node.start) from None


def _pairs(req: _Request, keyword: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    req.parse_flags()
    if not req.args:
        raise Problem(f"{keyword} requires at least one argument")
    triples = [req.args[i : i + 3] for i in range(0, len(req.args), 3)]
    if any(not key for key, _, _ in triples):
        raise Problem(f"{keyword} names can not be blank")
    return tuple((key, value) for key, value, _ in triples), any(sep == "" for _, _, sep in triples)


def _env(req: _Request) -> Instruction:
    pairs, legacy = _pairs(req, "ENV")
    return EnvInstruction(pairs=pairs, legacy=legacy, **req.base)


def _label(req: _Request) -> Instruction:
    pairs, legacy = _pairs(req, "LABEL")
    return LabelInstruction(pairs=pairs, legacy=legacy, **req.base)


def _maintainer(req: _Request) -> Instruction:
    maintainer = req.exactly_one("MAINTAINER")
    req.parse_flags()
    return MaintainerInstruction(maintainer=maintainer, **req.base)


def _declare_source_flags(req: _Request, keyword: str) -> None:
    if len(req.args) < 2:
        raise Problem(
            f"{keyword} requires at least two arguments, but only one was provided. Destination could not be determined"
        )
    req.flags.add_strings("exclude")
    req.flags.add_string("chown")
    req.flags.add_string("chmod")
    req.flags.add_bool("link")


def _split_sources(req: _Request, keyword: str) -> _SourceFields:
    *sources, dest = req.args
    if maybe_heredoc(dest) is not None:
        raise Problem(f"{keyword} cannot accept a heredoc as a destination")
    bodies = {doc.name: doc for doc in req.node.heredocs}
    paths: list[str] = []
    contents: list[InlineSource] = []
    for source in sources:
        doc = maybe_heredoc(source)
        if doc is None:
            paths.append(source)
            continue
        body = bodies.get(doc.name)
        data = body.content if body is not None else ""
        contents.append(InlineSource(doc.name, chomp(data) if doc.chomp else data, doc.expand))
    values = req.flags.values
    return _SourceFields(
        sources=tuple(paths),
        dest=dest,
        contents=tuple(contents),
        chown=values["chown"] or None,
        chmod=values["chmod"] or None,
        link=req.flags.true("link"),
        excludes=tuple(req.flags.lists["exclude"]),
        json=req.node.json,
    )


def _copy(req: _Request) -> Instruction:
    _declare_source_flags(req, "COPY")
    req.flags.add_bool("parents")
    req.flags.add_string("from")
    req.parse_flags()
    fields = _split_sources(req, "COPY")
    from_ = req.flags.values["from"] or None
    return CopyInstruction(from_=from_, parents=req.flags.true("parents"), **fields, **req.base)


def _add(req: _Request) -> Instruction:
    _declare_source_flags(req, "ADD")
    req.flags.add_bool("keep-git-dir")
    req.flags.add_string("checksum")
    req.flags.add_bool("unpack")
    req.parse_flags()
    fields = _split_sources(req, "ADD")
    return AddInstruction(
        checksum=req.flags.values["checksum"] or None,
        keep_git_dir=req.flags.optional_bool("keep-git-dir"),
        unpack=req.flags.optional_bool("unpack"),
        **fields,
        **req.base,
    )


def _from(req: _Request) -> Instruction:
    args = req.args
    name = None
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise Problem(
                f'invalid name for build stage: "{args[2]}", name can\'t start with a number or contain symbols'
            )
    elif len(args) != 1:
        raise Problem("FROM requires either one or three arguments")
    req.flags.add_string("platform")
    req.parse_flags()
    platform = req.flags.values["platform"] or None
    return FromInstruction(image=args[0], name=name, platform=platform, **req.base)


def _onbuild(req: _Request) -> Instruction:
    if not req.args or req.node.child is None:
        raise Problem("ONBUILD requires at least one argument")
    req.parse_flags()
    trigger = req.node.child.keyword.upper()
    if trigger == "ONBUILD":
        raise Problem("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("MAINTAINER", "FROM"):
        raise Problem(f"{trigger} isn't allowed as an ONBUILD trigger")
    expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", req.node.original, count=1)
    for doc in req.node.heredocs:
        expression += "\n" + doc.content + doc.name
    child = req.node.child
    child.start, child.end, child.heredocs = req.node.start, req.node.end, req.node.heredocs
    inner = parse_instruction(child, req.location.file, req.escape)
    return OnbuildInstruction(expression=expression, trigger=inner, **req.base)


def _workdir(req: _Request) -> Instruction:
    path = req.exactly_one("WORKDIR")
    req.parse_flags()
    return WorkdirInstruction(path=path, **req.base)


def _run(req: _Request) -> Instruction:
    req.flags.add_strings("mount")
    req.flags.add_string("network", "default")
    req.flags.add_string("security", "sandbox")
    req.parse_flags()
    mounts = tuple(req.flags.lists["mount"])
    try:
        options = tuple(parse_mount(m, None) for m in mounts)
    except ValueError as e:
        raise Problem(str(e)) from None
    network, security = req.flags.values["network"], req.flags.values["security"]
    if network not in ("default", "none", "host"):
        raise Problem(f'network mode "{network}" not supported')
    if security not in ("sandbox", "insecure"):
        raise Problem(f'security "{security}" is not valid')
    return RunInstruction(
        args=req.command_args(),
        prepend_shell=not req.node.json,
        heredocs=tuple(req.node.heredocs),
        mounts=mounts,
        mount_options=options,
        network=network,
        security=security,
        **req.base,
    )


def _cmd(req: _Request) -> Instruction:
    req.parse_flags()
    return CmdInstruction(args=req.command_args(), prepend_shell=not req.node.json, **req.base)


def _entrypoint(req: _Request) -> Instruction:
    req.parse_flags()
    args = req.command_args() or None
    return EntrypointInstruction(args=args, prepend_shell=not req.node.json, **req.base)


def _healthcheck(req: _Request) -> Instruction:
    req.at_least_one("HEALTHCHECK")
    kind = req.args[0].upper()
    rest = req.args[1:]
    if kind == "NONE":
        if rest:
            raise Problem("HEALTHCHECK NONE takes no arguments")
        return HealthcheckInstruction(test=("NONE",), **req.base)
    names = ("interval", "timeout", "start-period", "start-interval", "retries")
    for name in names:
        req.flags.add_string(name)
    req.parse_flags()
    if kind != "CMD":
        raise Problem(f'Unknown type "{kind}" in HEALTHCHECK (try CMD)')
    command = tuple(rest) if req.node.json else ((" ".join(rest),) if rest else ())
    if not command:
        raise Problem("Missing command after HEALTHCHECK CMD")
    test = ("CMD", *command) if req.node.json else ("CMD-SHELL", *command)
    values = req.flags.values
    try:
        interval, timeout, start_period, start_interval = (parse_interval(n, values[n]) for n in names[:4])
        retries = parse_go_int32(values["retries"]) if values["retries"] else 0
    except ValueError as e:
        raise Problem(str(e)) from None
    if retries < 0:
        raise Problem(f"--retries cannot be negative ({retries})")
    return HealthcheckInstruction(
        test=test,
        interval=interval,
        timeout=timeout,
        start_period=start_period,
        start_interval=start_interval,
        retries=retries,
        **req.base,
    )


def _expose(req: _Request) -> Instruction:
    req.at_least_one("EXPOSE")
    req.parse_flags()
    return ExposeInstruction(ports=tuple(sorted(req.args)), **req.base)


def _user(req: _Request) -> Instruction:
    user = req.exactly_one("USER")
    req.parse_flags()
    return UserInstruction(user=user, **req.base)


def _volume(req: _Request) -> Instruction:
    req.at_least_one("VOLUME")
    req.parse_flags()
    volumes = tuple(v.strip() for v in req.args)
    if "" in volumes:
        raise Problem("VOLUME specified can not be an empty string")
    return VolumeInstruction(volumes=volumes, json=req.node.json, **req.base)


def _stopsignal(req: _Request) -> Instruction:
    # BuildKit never parses STOPSIGNAL's flags (unknown ones are ignored).
    return StopsignalInstruction(signal=req.exactly_one("STOPSIGNAL"), **req.base)


def _arg(req: _Request) -> Instruction:
    # BuildKit never parses ARG's flags (unknown ones are ignored).
    req.at_least_one("ARG")
    definitions = []
    for word in req.args:
        name, eq, default = word.partition("=")
        if eq and not name:
            raise Problem("ARG names can not be blank")
        definitions.append(ArgDefinition(name, default if eq else None))
    return ArgInstruction(args=tuple(definitions), **req.base)


def _shell(req: _Request) -> Instruction:
    req.parse_flags()
    shell = req.command_args()
    if not shell:
        raise Problem("SHELL requires at least one argument")
    if not req.node.json:
        raise Problem("SHELL requires the arguments to be in JSON form")
    return ShellInstruction(shell=shell, **req.base)


_PARSERS: dict[str, Callable[[_Request], Instruction]] = {
    "add": _add,
    "arg": _arg,
    "cmd": _cmd,
    "copy": _copy,
    "entrypoint": _entrypoint,
    "env": _env,
    "expose": _expose,
    "from": _from,
    "healthcheck": _healthcheck,
    "label": _label,
    "maintainer": _maintainer,
    "onbuild": _onbuild,
    "run": _run,
    "shell": _shell,
    "stopsignal": _stopsignal,
    "user": _user,
    "volume": _volume,
    "workdir": _workdir,
}
KEYWORDS = sorted(name.upper() for name in _PARSERS)
