"""Property tests (hypothesis) for the parsers that take untrusted text: whatever they are given, they return or
raise imgci's own error for that input, never another exception, and finish in bounded time.

- Dockerfiles (:func:`imgci.build.dockerfile.parse_dockerfile`), built from Dockerfile-ish tokens — keywords, flags,
  quotes, escapes, ``${…}`` forms, heredocs, directives, unicode, NUL, very long lines — then taken through what the
  dispatcher does with them (ARG scope, stages needed, every instruction expanded): only ``DockerfileError``.
- Variable expansion (:mod:`imgci.build.dockerfile.shell`): ``expand_word``/``expand_words`` raise only
  ``DockerfileError``; ``ShellLexer.process`` (every option) only ``ShellError``.
- Image references (:func:`imgci.reference.parse`): ``InvalidReferenceError``, or a Reference whose text parses
  back to the same value and matches distribution/reference's grammar (ASCII, nothing after the last character).
- Digests (:meth:`imgci.oci.Digest.parse`): ``InvalidDigestError``, or exactly ``sha256:``/``sha512:`` and hex.
- build.yaml (:func:`imgci.config.load_plan`) on YAML-ish documents: only ``ConfigError``/``UsageError``.

Each example must finish within ``EXAMPLE_SECONDS``; a SIGALRM at ``HANG_SECONDS`` turns a hang into a failure.
``IMGCI_FUZZ_EXAMPLES=N`` runs N random examples a property instead of CI's fixed 200.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgci.build.dockerfile import (
    ArgInstruction,
    ArgScope,
    CopyInstruction,
    Dockerfile,
    EnvInstruction,
    OnbuildInstruction,
    RunInstruction,
    base_of,
    expand_word,
    expand_words,
    parse_dockerfile,
    parse_trigger,
    resolve_copy_from,
    resolve_mount_from,
    stages_needed,
)
from imgci.build.dockerfile.patterns import ShellError
from imgci.build.dockerfile.shell import ShellLexer
from imgci.config import ConfigError, load_plan
from imgci.errors import DockerfileError, InvalidDigestError, InvalidReferenceError, UsageError
from imgci.oci import Digest
from imgci.reference import Reference, parse

EXAMPLE_SECONDS = 2.0
HANG_SECONDS = 20
# CI runs 200 derandomized examples a property (the same ones every run); IMGCI_FUZZ_EXAMPLES=5000 hunts further with
# fresh random examples each run.
EXAMPLES = int(os.environ.get("IMGCI_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="IMGCI_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T = TypeVar("T")


class Hang(Exception):
    """An example ran for HANG_SECONDS."""


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """Fail an example that takes longer than EXAMPLE_SECONDS (and stop one that hangs). The real-time timer is
    shared with pytest-timeout's signal method: what was left of its timer is re-armed afterwards."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        elapsed = time.monotonic() - start
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - elapsed, 0.001))
    assert elapsed < EXAMPLE_SECONDS, f"{what} took {elapsed:.2f} s"


def only(allowed: tuple[type[BaseException], ...], call: Callable[[], T]) -> T | None:
    """``call()``; None when it raised one of ``allowed`` (anything else propagates and fails the example)."""
    try:
        return call()
    except allowed:
        return None


# -- Dockerfiles ----------------------------------------------------------------------------------------------------
KEYWORDS = (
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "from", "run", "Copy", "onbuild", "FORM",
)  # fmt: skip
FLAGS = (
    "--from=", "--from=base", "--from=0", "--from=${STAGE}", "--platform=", "--platform=linux/amd64",
    "--platform=$BUILDPLATFORM", "--chown=", "--chown=1:2", "--chmod=", "--chmod=0755", "--chmod=u+x", "--link",
    "--link=false", "--parents", "--exclude=*.md", "--checksum=", "--checksum=sha256:00", "--keep-git-dir",
    "--keep-git-dir=true", "--unpack=false", "--network=none", "--network=", "--security=insecure",
    "--mount=", "--mount=type=cache,target=/c", "--mount=type=cache,id=x,sharing=locked,target=/c,mode=0755",
    "--mount=type=secret,id=s", "--mount=type=secret,id=s,env=S,required", "--mount=type=ssh",
    "--mount=type=bind,from=base,source=/,target=/m,rw", "--mount=type=tmpfs,target=/t,size=1k",
    "--mount=type=bind,target", "--mount=type=weird", "--mount=target=/x,type=cache,uid=-1",
    "--interval=", "--interval=5s", "--timeout=1m", "--start-period=0", "--retries=-1", "--retries=x",
    "--", "-", "--=", "--unknown-flag", "--FROM=x",
)  # fmt: skip
WORDS = (
    "scratch", "busybox", "busybox:latest", "base", "AS", "as", "x", "/", "/app", ".", "..", "*", "?", "[", "]",
    "[\"sh\", \"-c\"]", "[\"a\"", "[]", "[\"\"]", "{", "}", "=", "==", "a=b", "a=", "=b", "a=\"b c\"", "'a b'",
    "\"", "'", "\\", "\\\\", "`", "$", "$$", "${", "}", "${X}", "${X:-d}", "${X:+a}", "${X-}", "${X?msg}", "${X:?}",
    "${X#p}", "${X##*/}", "${X%.*}", "${X%%x}", "${X/a/b}", "${X//a}", "${#X}", "${X:=y}", "${X:-${Y:-${Z}}}",
    "${X", "${}", "${:-}", "$X", "$1", "\\$X", "NONE", "CMD", "CMD [\"true\"]", "RUN", "FROM", "8080/tcp",
    "80-90/udp", "SIGKILL", "9", "<<EOF", "<<-EOF", "<<\"EOF\"", "<<'E'", "<<EOF1", "<<", "<<<", "EOF", "E",
    "0<<EOF", "<<EOF cat", "#", "# comment", "&&", "||", ";", "|", ">", "2>&1", "https://example.com/a.tar.gz",
    "git@github.com:a/b.git", "https://u:p@h/x.git#main:sub", "é", "한국어", "\u200b", "\u00a0", "\x00", "\x1c",
    "\x85", "\u2028", "\udcff", "\ufeff", "\t", "\r", "\f", "\v",
)  # fmt: skip
DIRECTIVES = (
    "# escape=`", "# escape=\\", "# escape=x", "#escape=`", "# syntax=docker/dockerfile:1", "# check=skip=all",
    "# ESCAPE=`", "# escape = `", "# escape=`\n# escape=\\", "# syntax=a\n# syntax=b", "#", "",
)  # fmt: skip

GOOD_LINES = (
    "FROM busybox", "FROM scratch AS base", "FROM --platform=$BUILDPLATFORM busybox AS b2", "FROM base", "ARG X=1",
    "ARG Y", "ENV A=1 B=\"x y\"", "ENV A 1", "WORKDIR /app", "COPY . /app", "COPY --from=base / /", "ADD a.tar /",
    "RUN echo hi", "RUN [\"sh\", \"-c\", \"true\"]", "CMD [\"sh\"]", "USER 1000:1000", "LABEL a=b",
    "EXPOSE 80/tcp", "VOLUME /data", "SHELL [\"/bin/sh\", \"-c\"]", "HEALTHCHECK CMD true", "STOPSIGNAL SIGTERM",
    "ONBUILD RUN true", "RUN <<EOF\necho hi\nEOF", "COPY <<EOF /f\nx\nEOF",
)  # fmt: skip
token = st.one_of(
    st.sampled_from(FLAGS),
    st.sampled_from(WORDS),
    st.sampled_from(WORDS),
    st.sampled_from(WORDS),
    st.text(max_size=4),
)
separator = st.sampled_from([" ", " ", " ", " ", " ", "", "\t", " \\\n", "`\n", "\n", "\\\n\n", "\\\n# c\n"])


@st.composite
def dockerfile_line(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 2)):  # two lines in three are valid, so that most files get past the parser
        return draw(st.sampled_from(GOOD_LINES))
    parts = [draw(st.sampled_from(KEYWORDS))] if draw(st.integers(0, 5)) else []
    for _ in range(draw(st.integers(1, 6))):
        parts += [draw(separator), draw(token)]
    line = "".join(parts)
    if draw(st.integers(0, 19)) == 0:  # now and then a very long line or a long run of continuations
        line += draw(st.sampled_from(["a", " x", "\\\n", "${X}", "'", "\\\\"])) * draw(st.integers(500, 20000))
    return line


@st.composite
def dockerfiles(draw: st.DrawFn) -> str:
    lines = [draw(st.sampled_from(DIRECTIVES))] if draw(st.integers(0, 3)) == 0 else []
    if draw(st.integers(0, 4)):
        lines.append(draw(st.sampled_from(["FROM busybox", "FROM scratch AS base", "ARG X=1\nFROM busybox:$X"])))
    lines += draw(st.lists(dockerfile_line(), max_size=8))
    return draw(st.sampled_from(["\n", "\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n", "\\", "\\\n"]))


def dispatch(df: Dockerfile) -> None:
    """What the builder does with a parsed Dockerfile before running anything: the stages the last one needs, the
    global ARG scope, each stage's base and every instruction expanded with the stage's ARG/ENV scope."""
    build_args = {"X": "1", "STAGE": "base", "EMPTY": ""}
    predefined = {"TARGETPLATFORM": "linux/amd64", "BUILDPLATFORM": "linux/amd64"}
    order = stages_needed(df, None, build_args, predefined=predefined)
    scope = ArgScope(df, build_args, predefined)
    for index in order:
        stage = df.stages[index]
        base_of(df, stage, scope.global_values)
        env = {"PATH": "/usr/bin:/bin"}
        for instruction in stage.instructions:
            if isinstance(instruction, ArgInstruction):
                for binding in scope.declare(instruction, env):
                    if binding.value is not None:
                        env[binding.name] = binding.value
                continue
            expanded = instruction.expand(env)
            if isinstance(expanded, EnvInstruction):
                env.update(expanded.pairs)
            if isinstance(expanded, OnbuildInstruction):  # as a later build whose base is this image reads it
                parse_trigger(expanded.expression, stage.from_).expand(env)
            if isinstance(expanded, CopyInstruction) and expanded.from_:
                resolve_copy_from(df, expanded)
            if isinstance(expanded, RunInstruction):
                for mount in expanded.mount_options:
                    if mount.get("from"):
                        resolve_mount_from(df, mount["from"])


@FUZZ
@given(dockerfiles())
@example("FROM busybox\nRUN <<EOF\n")
@example("FROM busybox\nCOPY <<A <<B /x\na\nA\n")
@example("# escape=`\nFROM busybox\nRUN echo `\n")
@example("FROM a AS b\nFROM b AS a\nCOPY --from=a / /\n")
@example("FROM busybox\nWORKDIR " + "${X:-" * 400 + "}" * 400 + "\n")
@example("FROM busybox\nENV " + "a=b " * 20000 + "\n")
@example("FROM busybox\n" + "RUN x \\\n" * 5000)
@example("FROM busybox\nENV A=" + "a" * 500_000 + "\n")  # a long word was quadratic to expand (4 s)
@example("FROM busybox\n" + "RUN <<EOF\nx\nEOF\n" * 1000)  # each heredoc re-parsed the rest of the file (4 s)
def test_dockerfile_parsing_raises_only_dockerfile_error(text: str) -> None:
    with bounded("parse_dockerfile"):
        df = only((DockerfileError,), lambda: parse_dockerfile(text, "Dockerfile"))
        if df is not None:
            only((DockerfileError,), lambda: dispatch(df))


# -- variable expansion ---------------------------------------------------------------------------------------------
PIECES = (
    "$", "${", "}", "{", "VAR", "UNSET", "EMPTY", "SP", "X", ":-", ":+", "-", "+", ":?", "?", "#", "##", "%", "%%",
    "/", "//", ":", ":=", "=", "*", "?", "\\", "\\\\", "\\}", "\\/", "'", "\"", "`", " ", "\t", "\n", "a", "b",
    "$1", "$@", "$$", "$#", "${#VAR}", "${VAR:-x}", "${VAR:+x}", "${VAR#pat}", "${VAR%pat}", "${VAR/a/b}",
    "${VAR//a/$1}", "${VAR/#a/b}", "${VAR/%a/b}", "${UNSET?err}", "${VAR/\\*/x}", "${VAR#\\z}", "é", "\x00",
    "\udcff", "[", "]", "(", ")", "^", ".", "|", "$0", "${1}", "${VAR//[/x}", "${VAR/(/x}", "\\$", "$'x'",
)  # fmt: skip
ENV = {"VAR": "a*b/c.d(e)[f]$1 \\x", "EMPTY": "", "SP": "a  b\tc", "X": "${VAR}", "U": "é\x00"}

words = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=20).map("".join),
    st.integers(1, 1000).map(lambda n: "${VAR:-" * n + "x" + "}" * n),
    st.integers(1, 1000).map(lambda n: "${VAR:-" * n),
)


@FUZZ
@given(words, st.sampled_from(["\\", "`"]))
@example("${VAR//\\", "\\")
@example("${VAR/a/${VAR/b/c}}", "\\")
@example("${VAR:-" * 1000, "\\")
@example("a" * 500_000, "\\")
def test_variable_expansion_raises_only_dockerfile_error(word: str, escape: str) -> None:
    with bounded("expand_word"):
        only((DockerfileError,), lambda: expand_word(word, ENV, escape=escape))
        only((DockerfileError,), lambda: expand_words(word, ENV, escape=escape))


@FUZZ
@given(words, st.sampled_from(["\\", "`"]), st.lists(st.booleans(), min_size=4, max_size=4))
def test_shell_lexer_raises_only_shell_error(word: str, escape: str, flags: list[bool]) -> None:
    raw_quotes, raw_escapes, skip_unset_env, skip_process_quotes = flags
    lexer = ShellLexer(
        escape,
        raw_quotes=raw_quotes,
        raw_escapes=raw_escapes,
        skip_unset_env=skip_unset_env,
        skip_process_quotes=skip_process_quotes,
    )
    with bounded("ShellLexer.process"):
        only((ShellError,), lambda: lexer.process(word, ENV))


# -- image references -----------------------------------------------------------------------------------------------
# distribution/reference's grammar (reference/regexp.go), ASCII like Go's regexp, plus the IPv6 zone imgci accepts.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:.%]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?:{_HOST}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha(?:256|512):[a-f0-9]+)?",
    re.ASCII,
)
REF_PIECES = (
    "docker.io/", "index.docker.io/", "registry-1.docker.io/", "localhost", "localhost:5000/", "127.0.0.1:5000/",
    "[::1]:5000/", "[::1]/", "[fe80::1%eth0]/", "[::g]/", "[", "]", "example.com/", "Example.COM/", "a.b-c.d:1/",
    "busybox", "library/", "a", "A", "0", "z9", "_", "__", "___", "-", "--", ".", "..", "/", "//", ":", "::",
    ":latest", ":v1.2.3", ":_x", ":.x", ":-x", ":" + "t" * 128, ":" + "t" * 129, "@", "@sha256:" + "a" * 64,
    "@sha256:" + "A" * 64, "@sha512:" + "0" * 128, "@sha256:abc", "@md5:" + "0" * 32, "é", "\u0661", "\n", " ",
    "\t", "\x00", "%", "#", "?", "\\", "x" * 255,
)  # fmt: skip
VALID_REFERENCES = (
    "busybox", "busybox:1.36", "library/busybox:latest", "docker.io/library/busybox", "ghcr.io/o/r:v1",
    "localhost:5000/a/b:c", "[::1]:5000/x@sha256:" + "a" * 64, "r.example/a/b:t@sha256:" + "b" * 64,
)  # fmt: skip


@st.composite
def mutated_reference(draw: st.DrawFn) -> str:
    """A valid reference with a few characters inserted, replaced or deleted."""
    text = draw(st.sampled_from(VALID_REFERENCES))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        char = draw(st.one_of(st.sampled_from("\n\t :/@.-_%[]Aé\u0661\u212a\x00"), st.characters()))
        kind = draw(st.sampled_from(["insert", "replace", "delete"]))
        text = text[:at] + ("" if kind == "delete" else char) + text[at + (kind != "insert") :]
    return text


references = st.one_of(
    mutated_reference(),
    st.lists(st.sampled_from(REF_PIECES), min_size=1, max_size=8).map("".join),
    st.text(max_size=40),
    st.text(alphabet="abc09._-/:@[]", max_size=30),
)


@FUZZ
@given(references, st.sampled_from(["latest", None]))
@example("busybox:v1\n@sha256:" + "a" * 64, "latest")
@example("a\n/b:1", "latest")
@example("busybox:tag\u00e9", "latest")
@example("local.host\n/x", "latest")
@example("docker.io/l.ibrary/busybox", "latest")  # found by a 15000-example run: familiar() dropped docker.io/
def test_reference_parse_round_trips_or_raises_invalid_reference(text: str, default_tag: str | None) -> None:
    with bounded("reference.parse"):
        ref = only((InvalidReferenceError,), lambda: parse(text, default_tag=default_tag))
    if ref is None:
        return
    assert isinstance(ref, Reference)
    shown = str(ref)
    assert _REFERENCE.fullmatch(shown), f"{text!r} parsed to {shown!r}, which is not a valid reference"
    assert parse(shown, default_tag=default_tag) == ref
    assert parse(ref.familiar(), default_tag=default_tag) == ref


_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", re.ASCII)


@st.composite
def mutated_digest(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(["sha256:" + "0123456789abcdef" * 4, "sha512:" + "f" * 128]))
    at = draw(st.integers(0, len(text)))
    char = draw(st.one_of(st.sampled_from("\n\r\t \x00/.:A\u0661\uff10"), st.characters()))
    return text[:at] + char + text[at + draw(st.integers(0, 1)) :]


@FUZZ
@given(st.one_of(mutated_digest(), st.text(max_size=80)))
@example("sha256:" + "a" * 64 + "\n")
def test_digest_parse_accepts_only_canonical_digests(text: str) -> None:
    """Digests name files in the store and go into URLs: nothing but ``algorithm:lowercase-hex`` may pass."""
    digest = only((InvalidDigestError,), lambda: Digest.parse(text))
    assert digest is None or _DIGEST.fullmatch(digest.value), f"{text!r} was accepted as a digest"


# -- build.yaml -----------------------------------------------------------------------------------------------------
YAML_KEYS = (
    "version", "targets", "defaults", "groups", "app", "web", "matrix", "include", "exclude", "inherits", "args",
    "labels", "tags", "platforms", "secrets", "ssh", "cache_from", "cache_to", "push", "outputs", "no_cache", "pull",
    "context", "dockerfile", "dockerfile_inline", "target", "flavour", "x", "<<", "? ", "- ",
)  # fmt: skip
YAML_VALUES = (
    "1", "2", "0", "-1", "1.0", "3.10", "true", "false", "yes", "null", "~", "''", '""', "[]", "{}", "[a, b]",
    "{a: 1}", "registry.example/app:${{ matrix.x }}", "${{ matrix.nope }}", "${{", "{{tag}}", "{{short_sha}}",
    "{{nope}}", "linux/amd64", "linux/arm64/v8", "windows/amd64", "nope", "Dockerfile", "../..", "/etc", ".",
    "type=registry,ref=r.example/c", "type=local", "id=s,env=S", "a b: c", "&a x", "*a", "*nope", "!!str 1",
    "!!python/object:os.system x", "!!binary aGk=", "!custom x", "|\n  x", ">-\n  x", "'unterminated", '"\\x"',
    "\t", "\x00", "é", "- a\n- b", "2001-01-01", "0x10", ".inf", "@x", "`x`", "%x",
)  # fmt: skip


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    lines = ["version: 1"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 14))):
        indent = "  " * draw(st.integers(0, 4))
        key = draw(st.one_of(st.sampled_from(YAML_KEYS), st.text(max_size=4)))
        sep = draw(st.sampled_from([": ", ":", " : ", ": &a ", ": !!map ", ":\n" + indent + "  - ", ": *a\n"]))
        value = draw(st.one_of(st.sampled_from(YAML_VALUES), st.text(max_size=6), st.just("")))
        lines.append(f"{indent}{key}{sep}{value}")
    return "\n".join(lines) + "\n"


def _laughs(levels: int) -> str:
    """Billion laughs: each level a list of ten aliases of the one before."""
    lines = ["version: 1", "x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    for n in range(1, levels + 1):
        lines.append(f"x{n}: &x{n} [{', '.join([f'*x{n - 1}'] * 10)}]")
    lines.append(f"targets: {{app: {{tags: *x{levels}}}}}")
    return "\n".join(lines) + "\n"


STRUCTURED = (
    "version: 1\ntargets:\n  app:\n    matrix:\n      x: [a, b]\n    tags: ['r.example/a:${{ matrix.x }}']\n",
    "version: 1\ntargets:\n  app: &t\n    inherits: [app]\n  web: *t\n",
    "version: 1\ntargets:\n  a: {inherits: [b]}\n  b: {inherits: [a]}\n",
    "version: 1\ndefaults: &d {push: true}\ntargets:\n  app:\n    <<: *d\n    <<: *d\n",
    "version: 1\ntargets:\n  app:\n    matrix: {include: [{x: 1}], exclude: [{x: 1}]}\n",
    "version: 1\ngroups: {default: [nope]}\ntargets: {app: {}}\n",
    "version: 1\ntargets: &a {app: *a}\n",
)


@pytest.fixture(scope="module")
def yaml_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="imgci-fuzz-yaml-") as d:
        (Path(d) / "Dockerfile").write_text("FROM scratch\n")
        yield Path(d)


@FUZZ
@given(st.one_of(yaml_documents(), st.sampled_from(STRUCTURED), st.text(max_size=200)))
@example(_laughs(9))
@example("version: 1\ntargets:\n  app: " + "[" * 600 + "]" * 600 + "\n")  # a RecursionError in PyYAML's composer
@example("version: 1\ntargets:\n  app: " + "[" * 100 + "]" * 100 + "\n")
@example("version: 1\ntargets: {app: {matrix: {" + ", ".join(f"d{n}: [a, b]" for n in range(20)) + "}}}\n")
def test_build_yaml_raises_only_config_errors(yaml_dir: Path, document: str) -> None:
    path = yaml_dir / "build.yaml"
    path.write_text(document, encoding="utf-8", errors="surrogatepass")
    with bounded("load_plan"):
        only((ConfigError, UsageError), lambda: load_plan(path, env={}, cwd=yaml_dir))
