"""Line-level parsing of a Dockerfile into nodes, as BuildKit's frontend/dockerfile/parser does.

Contract: :func:`parse_nodes` turns the text into :class:`Node` s (one per instruction: keyword as written, the
logical line with continuations joined, builder flags, arguments as BuildKit's line parsers split them, heredocs,
1-based start/end lines) plus the parser directives and the escape character. It raises
:class:`~imgci.errors.DockerfileError` with the line for anything BuildKit's parser rejects.

How dockerfile-parse is used: it groups physical lines into instructions (comments inside continuations skipped,
continuation lines with the escape character, instruction start/end line numbers). It is fed a *skeleton* of the
file in which each line has been classified by BuildKit's rules first (comment/blank → ``#``, content → its first
token, plus the escape character when BuildKit continues the line), because on the raw text it diverges from
BuildKit in five places: it knows nothing about heredocs (their bodies would become instructions), it ends an
instruction at an empty continuation line (BuildKit skips it), it treats ``foo \\\\`` (escaped escape) as a
continuation, it stops looking for ``# escape=`` after a ``# check=`` directive, and it drops an instruction that
is still continued at end of file. After each heredoc the rest of the file is parsed again from the line after the
terminator. The logical line itself is rebuilt from the original text with BuildKit's rules.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from dockerfile_parse import DockerfileParser
from dockerfile_parse.constants import COMMENT_INSTRUCTION

from imgci.build.dockerfile.lineparse import (
    Heredoc,
    Node,
    ParseError,
    heredocs_from_line,
    lstrip_ws,
    new_node,
)
from imgci.build.dockerfile.shell import go_quote
from imgci.errors import DockerfileError

_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*")
KNOWN_DIRECTIVES = ("syntax", "escape", "check")


@dataclass(frozen=True)
class ParsedFile:
    directives: dict[str, str]
    directive_lines: dict[str, int]
    escape: str
    nodes: list[Node]
    warnings: list[str]


def _is_comment(line: str) -> bool:
    return lstrip_ws(line).startswith("#")


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split on ``\\n`` only (as Go's scanner does)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def continuation_regex(escape: str) -> re.Pattern[str]:
    e = re.escape(escape)
    return re.compile(rf"([^{e}]){e}[ \t]*$|^{e}[ \t]*$")


def _trim_continuation(line: str, cont: re.Pattern[str]) -> tuple[str, bool]:
    m = cont.search(line)
    if m is None:
        return line, True
    return line[: m.start()] + (m.group(1) or ""), False


def _parse_directives(lines: list[str], filename: str) -> tuple[dict[str, str], dict[str, int], str]:
    directives: dict[str, str] = {}
    where: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = lstrip_ws(raw.rstrip("\r\n"))
        if not line.startswith("#"):
            break
        m = _DIRECTIVE.fullmatch(lstrip_ws(line[1:]))
        if m is None or m.group(1).lower() not in KNOWN_DIRECTIVES:
            break
        key = m.group(1).lower()
        if key in directives:
            raise DockerfileError(f"only one {key} parser directive can be used", file=filename, line=number)
        directives[key], where[key] = m.group(2), number
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(
            f"invalid escape token '{escape}' does not match ` or \\", file=filename, line=where["escape"]
        )
    return directives, where, escape


def _skeleton_line(raw: str, escape: str, cont: re.Pattern[str]) -> str:
    body = raw.rstrip("\r\n")
    if _is_comment(body) or not lstrip_ws(body):
        return "#\n"
    # The first word, reduced to characters every regex of dockerfile-parse sees as an ordinary word.
    token = re.sub(r"[^A-Za-z0-9_.-]", "", re.split(r"[\t\v\f\r ]", lstrip_ws(body), maxsplit=1)[0]) or "x"
    return f"{token} {escape}\n" if cont.search(body) else f"{token}\n"


def _window(lines: list[str], pos: int, escape: str, cont: re.Pattern[str]) -> list[str]:
    """The skeleton of ``lines[pos:]`` up to the end of the first instruction with ``<<`` on a line (which may be a
    heredoc, after whose body parsing starts again): a whole number of instructions, so that every line is grouped
    once or twice, not once per heredoc before it (that was quadratic: 1000 heredocs took 4 s)."""
    skeleton: list[str] = []
    marker = False
    for raw in lines[pos:]:
        line = _skeleton_line(raw, escape, cont)
        skeleton.append(line)
        marker = marker or "<<" in raw
        if marker and line != "#\n" and not line.endswith(escape + "\n"):
            break  # a content line that is not continued ends the instruction
    return skeleton


def _instruction_ranges(
    lines: list[str], pos: int, escape: str, cont: re.Pattern[str]
) -> tuple[list[tuple[int, int]], int]:
    """0-based inclusive line ranges of the instructions in a window of ``lines[pos:]`` (see :func:`_window`),
    grouped by dockerfile-parse, and the index of the first line after the window."""
    skeleton = _window(lines, pos, escape, cont)
    data = ("# escape=" + escape + "\n" + "".join(skeleton)).encode("utf-8")
    structure = DockerfileParser(fileobj=io.BytesIO(data)).structure
    ranges = sorted(
        (e["startline"] - 1 + pos, e["endline"] - 1 + pos) for e in structure if e["instruction"] != COMMENT_INSTRUCTION
    )
    content = [i + pos for i, s in enumerate(skeleton) if s != "#\n"]
    if content and skeleton[content[-1] - pos].endswith(escape + "\n"):
        # Still continued at end of file: dockerfile-parse drops that instruction, BuildKit ends it at the last line.
        after = ranges[-1][1] + 1 if ranges else pos
        ranges.append((next(i for i in content if i >= after), pos + len(skeleton) - 1))
    return ranges, pos + len(skeleton)


def _join(lines: list[str], start: int, end: int, cont: re.Pattern[str]) -> tuple[str, bool]:
    """BuildKit's logical line for physical lines ``start..end``; also whether an empty continuation was skipped."""
    line, eol = _trim_continuation(lstrip_ws(lines[start].rstrip("\r\n")), cont)
    empty_continuation = False
    i = start + 1
    while not eol and i <= end:
        raw = lines[i].rstrip("\r\n")
        i += 1
        if _is_comment(raw):
            continue
        if not lstrip_ws(raw):
            empty_continuation = True
            continue
        piece, eol = _trim_continuation(raw, cont)
        line += piece
    assert i == end + 1, "dockerfile-parse and BuildKit disagree on an instruction's lines"
    return line, empty_continuation


def parse_nodes(text: str, filename: str) -> ParsedFile:
    """Split ``text`` into instruction nodes (see the module docstring)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = split_lines(text)
    directives, directive_lines, escape = _parse_directives(lines, filename)
    cont = continuation_regex(escape)
    nodes: list[Node] = []
    warnings: list[str] = []
    pos = 0
    while pos < len(lines):
        restart: int | None = None
        ranges, window_end = _instruction_ranges(lines, pos, escape, cont)
        for start, end in ranges:
            line, empty_continuation = _join(lines, start, end, cont)
            if empty_continuation:
                warnings.append(
                    f"line {start + 1}: empty continuation line (will become an error in a future BuildKit)"
                )
            try:
                node = new_node(line, escape)
                node.start, node.end = start + 1, end + 1
                if node.can_contain_heredoc() and "<<" in line:
                    restart = _read_heredocs(node, line, lines, end + 1)
            except ParseError as e:
                raise DockerfileError(str(e), file=filename, line=start + 1) from None
            nodes.append(node)
            if restart is not None:
                break
        if restart is None and window_end >= len(lines):
            break
        pos = window_end if restart is None else restart
    return ParsedFile(directives, directive_lines, escape, nodes, warnings)


def _read_heredocs(node: Node, line: str, lines: list[str], index: int) -> int | None:
    """Attach the bodies of the heredocs named on ``line``; returns the index after the last terminator."""
    docs = heredocs_from_line(line)
    if not docs:
        return None
    for doc in docs:
        content: list[str] = []
        while index < len(lines):
            raw = lines[index]
            index += 1
            candidate = raw.rstrip("\r\n")
            if doc.chomp:
                candidate = candidate.lstrip("\t")
            if candidate == doc.name:
                break
            content.append(raw)
        else:
            raise ParseError(f"unterminated heredoc {go_quote(doc.name)}")
        node.heredocs.append(Heredoc(doc.name, "".join(content), doc.chomp, doc.expand, doc.fd))
    node.end = index
    return index
