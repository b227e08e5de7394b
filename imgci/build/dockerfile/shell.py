"""Variable substitution exactly as BuildKit's Dockerfile shell lexer (frontend/dockerfile/shell/lex.go).

Contract: :func:`expand_word` is BuildKit's ``ProcessWord`` (one word in, one string out: quotes removed, escapes
processed, variables substituted, whitespace kept) and :func:`expand_words` is ``ProcessWords`` (the same, then split
into words the way BuildKit does: text that came from a variable is split on whitespace, quoted text is not).
Failures raise :class:`~imgci.errors.DockerfileError` at the location the caller passes.

Supported (BuildKit dockerfile frontend 1.x, current stable): ``$VAR``, ``${VAR}``, ``${VAR:-word}``,
``${VAR-word}``, ``${VAR:+word}``, ``${VAR+word}``, ``${VAR:?msg}``, ``${VAR?msg}``, ``${VAR#pat}``, ``${VAR##pat}``,
``${VAR%pat}``, ``${VAR%%pat}``, ``${VAR/pat/repl}``, ``${VAR//pat/repl}`` (patterns: ``*``, ``?``, ``\\`` escapes;
no bracket expressions). Not supported, exactly like BuildKit: ``${#VAR}`` (an error), ``${VAR:=word}`` (an error),
command substitution and arithmetic (literal text). ``$1``, ``$@``, ``$$``… look up a variable of that name (normally
unset, so empty).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

from imgci.build.dockerfile.patterns import ShellError, go_expand, pattern_to_regex, trim_prefix, trim_suffix
from imgci.errors import DockerfileError

_EOF = ""
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
# How deeply ${…} may nest. BuildKit (Go, growable stacks) has no limit; here each level costs two Python frames, so
# without one a deep nesting is a RecursionError instead of a Dockerfile error. Real Dockerfiles nest a few levels.
MAX_NESTING = 100
# Go's unicode.IsSpace for Latin-1 (Python's str.isspace also counts \x1c-\x1f, Go does not).
_LATIN1_SPACE = frozenset("\t\n\v\f\r \x85\xa0")


def is_space(ch: str) -> bool:
    """Go's ``unicode.IsSpace``."""
    if ord(ch) < 0x100:
        return ch in _LATIN1_SPACE
    return ch.isspace()


def go_quote(text: str) -> str:
    """Roughly Go's ``%q``: a double-quoted string with backslash escapes (for messages only)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f'"{out}"'


class _Words:
    """BuildKit's wordsStruct: how ProcessWords splits the result into words."""

    def __init__(self) -> None:
        self.word: list[str] = []  # the current word's pieces (``+=`` on a str attribute is quadratic)
        self.words: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if is_space(ch) and self.in_word:
            if self.word:
                self.words.append("".join(self.word))
                self.word = []
                self.in_word = False
        elif not is_space(ch):
            self.add_raw_char(ch)

    def add_raw_char(self, ch: str) -> None:
        if ch:
            self.word.append(ch)
        self.in_word = True

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw_string(self, text: str) -> None:
        if text:
            self.word.append(text)
        self.in_word = True

    def get_words(self) -> list[str]:
        if self.word:
            self.words.append("".join(self.word))
            self.word = []
            self.in_word = False
        return self.words


class ShellLexer:
    """One configured lexer (BuildKit's ``shell.Lex``); ``process`` returns (word, words).

    ``raw_quotes`` keeps quote characters in the output, ``raw_escapes`` keeps escape characters,
    ``skip_unset_env`` leaves references to unset variables as written, ``skip_process_quotes`` treats quotes as
    ordinary characters (used for heredoc bodies).
    """

    def __init__(
        self,
        escape: str = "\\",
        *,
        raw_quotes: bool = False,
        raw_escapes: bool = False,
        skip_unset_env: bool = False,
        skip_process_quotes: bool = False,
    ) -> None:
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.raw_escapes_default = raw_escapes
        self.skip_unset_env = skip_unset_env
        self.skip_process_quotes = skip_process_quotes
        self._text = ""
        self._pos = 0
        self._env: Mapping[str, str] = {}
        self._raw_escapes = raw_escapes
        self._depth = 0
        self.matched: set[str] = set()

    def process(self, word: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
        """Substitute ``env`` into ``word``; raises ShellError with BuildKit's message."""
        self._text, self._pos, self._env = word, 0, env
        self._raw_escapes = self.raw_escapes_default
        self._depth = 0
        self.matched = set()
        try:
            return self._process_stop_on(None, self.raw_escapes_default)
        except ShellError as e:
            raise ShellError(f"failed to process {go_quote(word)}: {e}") from None

    # -- scanner -------------------------------------------------------------------------------------------------
    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else _EOF

    def _next(self) -> str:
        ch = self._peek()
        if ch:
            self._pos += 1
        return ch

    def _get_env(self, name: str) -> tuple[str, bool]:
        if name in self._env:
            self.matched.add(name)
            return self._env[name], True
        return "", False

    # -- grammar ---------------------------------------------------------------------------------------------------
    def _process_stop_on(self, stop: str | None, raw_escapes: bool) -> tuple[str, list[str]]:
        if self._depth > MAX_NESTING:
            raise ShellError(f"substitutions nested more than {MAX_NESTING} deep")
        saved, self._raw_escapes = self._raw_escapes, raw_escapes
        self._depth += 1
        try:
            result: list[str] = []
            words = _Words()
            while self._peek() != _EOF:
                ch = self._peek()
                if stop is not None and ch == stop:
                    self._next()
                    return "".join(result), words.get_words()
                if ch == "$" or (not self.skip_process_quotes and ch in "'\""):
                    tmp = self._dollar() if ch == "$" else self._single_quote() if ch == "'" else self._double_quote()
                    result.append(tmp)
                    if ch == "$":
                        words.add_string(tmp)
                    else:
                        words.add_raw_string(tmp)
                    continue
                ch = self._next()
                if ch == self.escape:
                    if self._raw_escapes:
                        words.add_raw_char(ch)
                        result.append(ch)
                    ch = self._next()
                    if ch == _EOF:
                        break
                    words.add_raw_char(ch)
                else:
                    words.add_char(ch)
                result.append(ch)
            if stop is not None:
                raise ShellError(f"unexpected end of statement while looking for matching {stop}")
            return "".join(result), words.get_words()
        finally:
            self._raw_escapes = saved
            self._depth -= 1

    def _single_quote(self) -> str:
        opening = self._next()
        result = [opening] if self.raw_quotes else []
        while True:
            ch = self._next()
            if ch == _EOF:
                raise ShellError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if self.raw_quotes:
                    result.append(ch)
                return "".join(result)
            result.append(ch)

    def _double_quote(self) -> str:
        opening = self._next()
        result = [opening] if self.raw_quotes else []
        while True:
            ch = self._peek()
            if ch == _EOF:
                raise ShellError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self._next()
                if self.raw_quotes:
                    result.append(ch)
                return "".join(result)
            if ch == "$":
                result.append(self._dollar())
                continue
            ch = self._next()
            if ch == self.escape:
                if self._raw_escapes:
                    result.append(ch)
                following = self._peek()
                if following == _EOF:
                    continue  # an escape at the very end is dropped; the loop then reports the missing quote
                if following in ('"', "$", self.escape):
                    ch = self._next()
            result.append(ch)

    def _process_name(self) -> str:
        name: list[str] = []
        while (ch := self._peek()) != _EOF:
            if not name and unicodedata.category(ch) == "Nd":
                while self._peek() != _EOF and unicodedata.category(self._peek()) == "Nd":
                    name.append(self._next())
                return "".join(name)
            if not name and ch in _SPECIAL_PARAMS:
                return self._next()
            if not (ch.isalpha() or unicodedata.category(ch) == "Nd" or ch == "_"):
                break
            name.append(self._next())
        return "".join(name)

    def _dollar(self) -> str:
        self._next()  # the $
        if self._peek() != "{":
            name = self._process_name()
            if not name:
                return "$"
            value, found = self._get_env(name)
            if not found and self.skip_unset_env:
                return "$" + name
            return value
        self._next()  # the {
        first = self._peek()
        if first == _EOF:
            raise ShellError("syntax error: missing '}'")
        if first in "{}:":
            raise ShellError("syntax error: bad substitution")
        name = self._process_name()
        ch = self._next()
        if ch == _EOF:
            raise ShellError("syntax error: missing '}'")
        modifier = ch
        if ch == "}":
            value, found = self._get_env(name)
            if not found and self.skip_unset_env:
                return "${" + name + "}"
            return value
        if ch == "/":
            return self._replace(name)
        null_is_unset = False
        if ch == ":":
            null_is_unset = True
            ch = self._next()
            if ch == _EOF:
                raise ShellError("syntax error: missing '}'")
            modifier += ch
        elif ch not in "+-?#%":
            raise ShellError(f"unsupported modifier ({modifier}) in substitution")
        try:
            word, _ = self._process_stop_on("}", ch in "#%")
        except ShellError:
            if self._peek() == _EOF:
                raise ShellError("syntax error: missing '}'") from None
            raise
        value, found = self._get_env(name)
        if self.skip_unset_env and not found:
            return "${" + name + modifier + word + "}"
        empty = not found or (null_is_unset and value == "")
        if ch == "-":
            return word if empty else value
        if ch == "+":
            return "" if empty else word
        if ch == "?":
            if not found:
                raise ShellError(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise ShellError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch in "#%":
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            return trim_suffix(word, value, greedy) if ch == "%" else trim_prefix(word, value, greedy)
        raise ShellError(f"unsupported modifier ({modifier}) in substitution")

    def _replace(self, name: str) -> str:
        replace_all = self._peek() == "/"
        if replace_all:
            self._next()
        try:
            pattern, _ = self._process_stop_on("/", True)
        except ShellError:
            if self._peek() == _EOF:
                raise ShellError("syntax error: missing '/' in ${}") from None
            raise
        try:
            replacement, _ = self._process_stop_on("}", True)
        except ShellError:
            if self._peek() == _EOF:
                raise ShellError("syntax error: missing '}'") from None
            raise
        value, found = self._get_env(name)
        if self.skip_unset_env and not found:
            return "${" + name + "/" + pattern + "/" + replacement + "}"
        regex = pattern_to_regex(pattern, greedy=True, anchored=False)
        if replace_all:
            return regex.sub(lambda m: go_expand(replacement, m), value)
        m = regex.search(value)
        return value if m is None else value[: m.start()] + replacement + value[m.end() :]


def expand_word(
    word: str, env: Mapping[str, str], *, escape: str = "\\", file: str = "Dockerfile", line: int = 0
) -> str:
    """BuildKit ``ProcessWord``: ``word`` with variables from ``env`` substituted, quotes and escapes processed.

    Raises DockerfileError (at ``file``:``line``) for syntax errors and ``${VAR?msg}`` failures.
    """
    try:
        return ShellLexer(escape).process(word, env)[0]
    except ShellError as e:
        raise DockerfileError(str(e), file=file, line=line) from None


def expand_words(
    word: str, env: Mapping[str, str], *, escape: str = "\\", file: str = "Dockerfile", line: int = 0
) -> list[str]:
    """BuildKit ``ProcessWords``: like :func:`expand_word`, then split into words (variable values are split on
    whitespace, quoted text is not; empty words are dropped)."""
    try:
        return ShellLexer(escape).process(word, env)[1]
    except ShellError as e:
        raise DockerfileError(str(e), file=file, line=line) from None
