"""BuildKit's line parsers: one logical Dockerfile line → a :class:`Node` (keyword, builder flags, arguments split
the way BuildKit splits them for that keyword), plus heredoc delimiter parsing.

Contract: :func:`new_node` never rejects an unknown keyword (that is the instruction layer's job); it raises
:class:`ParseError` for what BuildKit's line parsers reject (non-string JSON arrays, malformed ENV/LABEL pairs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from imgci.build.dockerfile.shell import ShellError, ShellLexer, go_quote, is_space

WHITESPACE = re.compile(r"[\t\v\f\r ]+")  # BuildKit's reWhitespace (no newline)
_HEREDOC = re.compile(r"([0-9]*)<<(-?)([^<]*)")
HEREDOC_KEYWORDS = ("add", "copy", "run")


class ParseError(Exception):
    """A line-level problem; converted to DockerfileError once the line is known."""


@dataclass(frozen=True)
class Heredoc:
    """One ``<<NAME`` document: ``content`` is the body exactly as written (line endings kept, tabs not chomped)."""

    name: str
    content: str = ""
    chomp: bool = False  # <<-NAME: leading tabs are removed from each line
    expand: bool = True  # False when any part of the delimiter word was quoted
    fd: int = 0  # 3<<EOF


@dataclass
class Node:
    """One instruction as BuildKit's parser produces it (before instruction-level parsing)."""

    keyword: str  # as written
    original: str  # the logical line (continuations joined, comments dropped), not trimmed
    flags: list[str]
    args: list[str]
    json: bool = False
    start: int = 0  # 1-based, the first line
    end: int = 0  # 1-based, the last line (a heredoc terminator when there are heredocs)
    heredocs: list[Heredoc] = field(default_factory=list)
    child: Node | None = None  # ONBUILD's trigger

    def can_contain_heredoc(self) -> bool:
        node = self.child if self.keyword.lower() == "onbuild" and self.child is not None else self
        return node.keyword.lower() in HEREDOC_KEYWORDS and not node.json


def lstrip_ws(text: str) -> str:
    i = 0
    while i < len(text) and is_space(text[i]):
        i += 1
    return text[i:]


def strip_ws(text: str) -> str:
    """Go's strings.TrimSpace."""
    text = lstrip_ws(text)
    j = len(text)
    while j > 0 and is_space(text[j - 1]):
        j -= 1
    return text[:j]


def parse_heredoc(word: str) -> Heredoc | None:
    """BuildKit ParseHeredoc: ``word`` as a heredoc delimiter (``<<EOF``, ``<<-"EOF"``, ``3<<EOF``) or None."""
    m = _HEREDOC.fullmatch(word)
    if m is None or not m.group(3):
        return None
    try:
        words = ShellLexer("\\", skip_unset_env=True).process(m.group(3), {})[1]
        if len(words) != 1:
            return None
        raw = ShellLexer("\\", raw_quotes=True, skip_unset_env=True).process(m.group(3), {})[1]
    except ShellError as e:
        raise ParseError(str(e)) from None
    if len(raw) != 1:
        raise ParseError(f"internal lexing of heredoc produced inconsistent results: {m.group(3)}")
    quotes = words[0].count("'") + words[0].count('"')
    raw_quotes = raw[0].count("'") + raw[0].count('"')
    return Heredoc(words[0], chomp=m.group(2) == "-", expand=quotes == raw_quotes, fd=int(m.group(1) or 0))


def maybe_heredoc(word: str) -> Heredoc | None:
    """BuildKit MustParseHeredoc: like :func:`parse_heredoc`, errors mean "not a heredoc"."""
    try:
        return parse_heredoc(word)
    except ParseError:
        return None


def heredocs_from_line(line: str) -> list[Heredoc]:
    try:
        words = ShellLexer("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True).process(line, {})[1]
    except ShellError:
        words = []
    return [doc for doc in map(parse_heredoc, words) if doc is not None]


# -- BuildKit's line parsers -----------------------------------------------------------------------------------------


def split_command(line: str) -> tuple[str, list[str], str]:
    """(keyword, flags, rest): BuildKit splitCommand + extractBuilderFlags."""
    parts = WHITESPACE.split(strip_ws(line), maxsplit=1)
    if len(parts) < 2:
        return parts[0], [], ""
    rest, flags = extract_builder_flags(parts[1])
    return parts[0], flags, strip_ws(rest)


def extract_builder_flags(line: str) -> tuple[str, list[str]]:
    """Leading ``--flag[=value]`` words (quotes removed, ``\\`` escapes, ``--`` ends them) and the rest."""
    words: list[str] = []
    phase, quote, blank_ok, word = "spaces", "", False, ""
    pos, n = 0, len(line)
    while pos <= n:
        ch = line[pos] if pos < n else ""
        if phase == "spaces":
            if pos == n:
                break
            if is_space(ch):
                pos += 1
                continue
            if ch != "-" or pos + 1 == n or line[pos + 1] != "-":
                return line[pos:], words
            phase = "word"
        if pos == n:
            if word != "--" and (blank_ok or word):
                words.append(word)
            break
        if phase == "word":
            if is_space(ch):
                if word == "--":
                    return line[pos:], words
                if blank_ok or word:
                    words.append(word)
                phase, word, blank_ok = "spaces", "", False
            elif ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
            elif ch == "\\":
                if pos + 1 < n:
                    pos += 1
                    word += line[pos]
            else:
                word += ch
            pos += 1
            continue
        if ch == quote:
            phase = "word"
        elif ch == "\\":
            if pos + 1 == n:
                phase = "word"
            else:
                pos += 1
                word += line[pos]
        else:
            word += ch
        pos += 1
    return "", words


def parse_words(rest: str, escape: str) -> list[str]:
    """BuildKit parseWords: split on whitespace outside quotes, keeping quotes and escapes in the words."""
    words: list[str] = []
    phase, quote, blank_ok, word = "spaces", "", False, ""
    pos, n = 0, len(rest)
    while pos <= n:
        ch = rest[pos] if pos < n else ""
        if phase == "spaces":
            if pos == n:
                break
            if is_space(ch):
                pos += 1
                continue
            phase = "word"
        if pos == n:
            if blank_ok or word:
                words.append(word)
            break
        if phase == "word":
            if is_space(ch):
                if blank_ok or word:
                    words.append(word)
                phase, word, blank_ok = "spaces", "", False
                pos += 1
                continue
            if ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
            if ch == escape:
                if pos + 1 == n:
                    pos += 1
                    continue
                word += ch
                pos += 1
                ch = rest[pos]
            word += ch
            pos += 1
            continue
        if ch == quote:
            phase = "word"
        if ch == escape and quote != "'":
            if pos + 1 == n:
                phase = "word"
                pos += 1
                continue
            pos += 1
            word += ch
            ch = rest[pos]
        word += ch
        pos += 1
    return words


def _reject_constant(name: str) -> object:
    raise ValueError(name)


def parse_json(rest: str) -> list[str] | None:
    """``rest`` as a JSON array of strings, or None when it is not a JSON array (then it is shell form)."""
    rest = lstrip_ws(rest)
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(item, str) for item in value):
        raise ParseError("when using JSON array syntax, arrays must be comprised of strings only")
    return value


def _name_val(rest: str, keyword: str, escape: str) -> list[str]:
    """ENV/LABEL: flattened (key, value, "=" or "" for the legacy ``KEY value`` form) triples, values raw."""
    words = parse_words(rest, escape)
    if not words:
        return []
    if "=" not in words[0]:
        parts = WHITESPACE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise ParseError(f"{keyword} must have two arguments")
        return [parts[0], parts[1], ""]
    out: list[str] = []
    for word in words:
        if "=" not in word:
            raise ParseError(f"Syntax error - can't find = in {go_quote(word)}. Must be of the form: name=value")
        key, value = word.split("=", 1)
        out += [key, value, "="]
    return out


def new_node(line: str, escape: str) -> Node:
    """BuildKit newNodeFromLine: dispatch the arguments to the keyword's line parser."""
    keyword, flags, rest = split_command(line)
    kind = keyword.lower()
    node = Node(keyword=keyword, original=line, flags=flags, args=[])
    if kind in ("run", "cmd", "entrypoint", "shell"):
        parsed = parse_json(rest) if rest else None
        node.json = parsed is not None
        node.args = parsed if parsed is not None else ([rest] if rest else [])
    elif kind in ("add", "copy", "volume"):
        parsed = parse_json(rest)
        node.json = parsed is not None
        node.args = parsed if parsed is not None else (WHITESPACE.split(rest) if rest else [])
    elif kind in ("expose", "from"):
        node.args = WHITESPACE.split(rest) if rest else []
    elif kind in ("maintainer", "stopsignal", "user", "workdir"):
        node.args = [rest] if rest else []
    elif kind in ("env", "label"):
        node.args = _name_val(rest, kind.upper(), escape)
    elif kind == "arg":
        node.args = parse_words(rest, escape)
    elif kind == "healthcheck":
        sep = 0
        while sep < len(rest) and not is_space(rest[sep]):
            sep += 1
        if sep:
            command = lstrip_ws(rest[sep:])
            parsed = parse_json(command) if command else None
            node.json = parsed is not None
            node.args = [rest[:sep]] + (parsed if parsed is not None else ([command] if command else []))
    elif kind == "onbuild" and rest:
        node.child = new_node(rest, escape)
        node.args = [node.child.keyword, *node.child.args]
    return node
