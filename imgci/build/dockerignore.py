""".dockerignore parsing and path matching, with the semantics of moby/patternmatcher as BuildKit uses them.

Contract:
- :func:`parse_dockerignore` turns file text into patterns exactly as BuildKit's ``ignorefile.ReadAll``: a UTF-8 BOM is
  dropped, lines *starting* with ``#`` are comments, surrounding whitespace is trimmed, blank lines are skipped, a
  leading ``!`` marks an exception, each pattern is cleaned like Go's ``filepath.Clean`` (so ``./a`` is ``a``) and one
  leading ``/`` is removed. The Dockerfile and ``.dockerignore`` get no special treatment (BuildKit sends the
  Dockerfile separately and filters the context with these patterns alone), so ignoring them makes them invisible
  to ``COPY`` like any other file.
- :class:`Matcher` decides with *last match wins*: patterns are tried in order, an exception (``!``) is only tried
  once the path is excluded and a plain pattern only while it is not. A pattern that matches a directory matches
  everything below it (parent matching, ``MatchesUsingParentResults``), so ``docs`` with ``!docs/README.md`` keeps
  only the README. ``**`` matches any number of directories, ``*``/``?`` never cross ``/``, ``[...]`` classes and
  ``\\`` escapes follow Go's ``filepath.Match``; a malformed pattern raises :class:`BuildError` naming its source.
- :meth:`Matcher.can_skip_dir` says whether a walker may skip an excluded directory without looking inside: only
  when no exception pattern could re-include something below it (fsutil's ``onlyPrefixExcludeExceptions`` rule).
- :func:`go_match` is Go's ``filepath.Match`` (used for ``COPY`` wildcards); :func:`has_wildcards` says whether a
  path component needs it.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imgci.errors import BuildError

_ESCAPE = set(".+()|{}$")
_PATTERN_CHARS = set("*[]?^\\")
_MAX_CACHE = 4096


class BadPatternError(ValueError):
    """Go's ``filepath.ErrBadPattern``."""


def go_clean(path: str) -> str:
    """Go's ``path.Clean``: lexical, ``""`` becomes ``.``, ``..`` at the root of an absolute path is dropped."""
    cleaned = posixpath.normpath(path) if path else "."
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def parse_dockerignore(text: str | bytes) -> list[str]:
    """The patterns of a ``.dockerignore`` file (see the module contract)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    patterns: list[str] = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = go_clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append("!" + pattern if invert else pattern)
    return patterns


# -- Go's filepath.Match ---------------------------------------------------------------------------------------
def _scan_chunk(pattern: str) -> tuple[bool, str, str]:
    star = False
    while pattern.startswith("*"):
        pattern = pattern[1:]
        star = True
    in_range = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 < len(pattern):
                i += 1
        elif c == "[":
            in_range = True
        elif c == "]":
            in_range = False
        elif c == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _get_esc(chunk: str) -> tuple[str, str]:
    if not chunk or chunk[0] in "-]":
        raise BadPatternError
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise BadPatternError
    char, rest = chunk[0], chunk[1:]
    if not rest:
        raise BadPatternError
    return char, rest


def _match_chunk(chunk: str, s: str) -> str | None:
    """The rest of ``s`` after ``chunk`` matched its start, or None; BadPatternError for a malformed chunk."""
    failed = False
    while chunk:
        if not failed and not s:
            failed = True
        c = chunk[0]
        if c == "[":
            char = ""
            if not failed:
                char, s = s[0], s[1:]
            chunk = chunk[1:]
            negated = chunk.startswith("^")
            if negated:
                chunk = chunk[1:]
            matched = False
            ranges = 0
            while True:
                if chunk.startswith("]") and ranges > 0:
                    chunk = chunk[1:]
                    break
                lo, chunk = _get_esc(chunk)
                hi = lo
                if chunk[0] == "-":
                    hi, chunk = _get_esc(chunk[1:])
                if lo <= char <= hi:
                    matched = True
                ranges += 1
            if matched == negated:
                failed = True
        elif c == "?":
            if not failed:
                if s[0] == "/":
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
        else:
            if c == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise BadPatternError
            if not failed:
                if chunk[0] != s[0]:
                    failed = True
                s = s[1:]
            chunk = chunk[1:]
    return None if failed else s


def go_match(pattern: str, name: str) -> bool:
    """Go's ``filepath.Match(pattern, name)`` on ``/``-separated paths; BadPatternError for a malformed pattern."""
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return "/" not in name
        rest = _match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        if star:
            matched = False
            i = 0
            while i < len(name) and name[i] != "/":
                rest = _match_chunk(chunk, name[i + 1 :])
                if rest is not None:
                    if not pattern and rest:
                        i += 1
                        continue
                    name = rest
                    matched = True
                    break
                i += 1
            if matched:
                continue
        while pattern:  # report a malformed remainder even though the match already failed
            _, chunk, pattern = _scan_chunk(pattern)
            _match_chunk(chunk, "")
        return False
    return not name


def has_wildcards(name: str) -> bool:
    """Whether ``name`` holds an unescaped ``*``, ``?`` or ``[`` (fsutil's ``containsWildcards``)."""
    i = 0
    while i < len(name):
        if name[i] == "\\":
            i += 2
            continue
        if name[i] in "*?[":
            return True
        i += 1
    return False


# -- patterns --------------------------------------------------------------------------------------------------
@dataclass
class Pattern:
    """One cleaned pattern; ``text`` is without the leading ``!`` of an exception."""

    text: str
    exclusion: bool
    kind: str = ""  # exact | prefix | suffix | regexp
    regexp: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        self._compile()

    def _compile(self) -> None:
        # A port of patternmatcher's compile(): the pattern becomes a regexp, or a cheaper exact/prefix/suffix test.
        out = ["^"]
        kind = "exact"
        pattern = self.text
        i = 0
        in_class = False
        while i < len(pattern):
            ch = pattern[i]
            if ch == "*" and not in_class:
                if i + 1 < len(pattern) and pattern[i + 1] == "*":
                    start = i
                    i += 2
                    if i < len(pattern) and pattern[i] == "/":
                        i += 1
                    if i >= len(pattern):
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            out.append(".*")
                            kind = "regexp"
                    else:
                        out.append("(.*/)?")
                        kind = "regexp"
                    if start == 0:
                        kind = "suffix"
                    continue
                out.append("[^/]*")
                kind = "regexp"
            elif ch == "?" and not in_class:
                out.append("[^/]")
                kind = "regexp"
            elif ch == "\\":
                if i + 1 < len(pattern):
                    i += 1
                    out.append(re.escape(pattern[i]))
                    kind = "regexp"
                else:
                    out.append(r"\\")
            elif ch == "[" and not in_class:
                out.append("[")
                in_class = True
                kind = "regexp"
                if pattern.startswith("^", i + 1):  # keep a leading negation as such, then a literal ']' if any
                    out.append("^")
                    i += 1
                if pattern.startswith("]", i + 1):
                    out.append(r"\]")
                    i += 1
            elif ch == "]" and in_class:
                out.append("]")
                in_class = False
            elif in_class:
                out.append(re.escape(ch) if ch in "[&~|" else ch)
            elif ch in _ESCAPE:
                out.append("\\" + ch)
            else:
                out.append(ch)
            i += 1
        self.kind = kind
        if kind == "regexp":
            try:
                self.regexp = re.compile("".join(out) + r"\Z")
            except re.error:
                raise BadPatternError from None

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regexp is not None
        return self.regexp.match(path) is not None

    def without_trailing_glob(self) -> str:
        return self.text.removesuffix("/**").removesuffix("/*")


MatchInfo = tuple[bool, ...]  # per pattern: did the parent directory match it


class Matcher:
    """Decides whether paths are excluded by a list of patterns; see the module contract.

    Paths are relative, ``/``-separated, without a leading ``/`` (``""`` is the root, never matched).
    """

    def __init__(self, patterns: Iterable[str], *, source: str = ".dockerignore") -> None:
        self.source = source
        self.patterns: list[Pattern] = []
        for raw in patterns:
            text = raw.strip()
            if not text:
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise BuildError(f'{source}: illegal exclusion pattern: "!"')
                text = text[1:]
            try:
                go_match(text, ".")
                self.patterns.append(Pattern(text, exclusion))
            except BadPatternError:
                raise BuildError(f"{source}: invalid pattern {raw.strip()!r}: syntax error in pattern") from None
        self.has_exclusions = any(p.exclusion for p in self.patterns)
        self._only_prefix_exceptions = not any(
            p.exclusion and _PATTERN_CHARS & set(p.without_trailing_glob()) for p in self.patterns
        )
        self._only_prefix_includes = not any(
            not p.exclusion and _PATTERN_CHARS & set(p.without_trailing_glob()) for p in self.patterns
        )
        self._infos: dict[str, MatchInfo] = {}

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def match_with_parent(self, path: str, parent: MatchInfo | None) -> tuple[bool, MatchInfo]:
        """patternmatcher's ``MatchesUsingParentResults``: ``parent`` is the MatchInfo of ``path``'s directory."""
        matched = False
        info: list[bool] = []
        for i, pattern in enumerate(self.patterns):
            hit = bool(parent) and parent[i]  # type: ignore[index]
            if not hit:
                if pattern.exclusion != matched:
                    info.append(False)
                    continue
                hit = pattern.match(path)
                if not hit and parent is None:
                    parts = path.split("/")[:-1]
                    hit = any(pattern.match("/".join(parts[: k + 1])) for k in range(len(parts)))
            info.append(hit)
            if hit:
                matched = not pattern.exclusion
        return matched, tuple(info)

    def _info(self, directory: str) -> MatchInfo | None:
        if not directory:
            return None
        cached = self._infos.get(directory)
        if cached is None:
            parent, _, _ = directory.rpartition("/")
            cached = self.match_with_parent(directory, self._info(parent))[1]
            if len(self._infos) >= _MAX_CACHE:
                self._infos.clear()
            self._infos[directory] = cached
        return cached

    def matches(self, path: str) -> bool:
        """Whether ``path`` is excluded, as a walker that descended from the root would decide."""
        path = path.strip("/")
        if not path or not self.patterns:
            return False
        parent, _, _ = path.rpartition("/")
        return self.match_with_parent(path, self._info(parent))[0]

    def can_skip_dir(self, directory: str) -> bool:
        """Whether nothing below the excluded ``directory`` can be re-included, so a walker need not enter it."""
        directory = directory.strip("/")
        if not self.matches(directory):
            return False
        if not self.has_exclusions:
            return True
        if not self._only_prefix_exceptions:
            return False
        prefix = directory + "/"
        return not any(p.exclusion and (p.without_trailing_glob() + "/").startswith(prefix) for p in self.patterns)

    def may_include_below(self, directory: str) -> bool:
        """For include patterns (``COPY --parents``): whether an entry below ``directory`` could match (else a
        walker may skip it). Conservative: True whenever a pattern has wildcards (fsutil's ``onlyPrefixIncludes``)."""
        directory = directory.strip("/")
        if not directory or not self._only_prefix_includes or self.matches(directory):
            return True
        prefix = directory + "/"
        return any(not p.exclusion and (p.without_trailing_glob() + "/").startswith(prefix) for p in self.patterns)


def matcher_or_none(patterns: Sequence[str], *, source: str) -> Matcher | None:
    """A Matcher for ``patterns``, or None when there are none (the common, free case)."""
    matcher = Matcher(patterns, source=source)
    return matcher if matcher else None
