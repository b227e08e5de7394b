"""Shell patterns in ``${VAR#pat}``, ``${VAR%pat}`` and ``${VAR/pat/repl}`` as BuildKit evaluates them
(convertShellPatternToRegex, trimPrefix/trimSuffix, Go's regexp replacement templates).

Contract: ``*`` matches any run, ``?`` one character, ``\\`` escapes ``*``, ``?`` and ``\\`` (and is dropped
before ``}`` and ``/``); any other escape raises :class:`ShellError`. No bracket expressions.
"""

from __future__ import annotations

import re

_EOF = ""


class ShellError(Exception):
    """A substitution failed; carries BuildKit's message. Converted to DockerfileError where the location is known."""


def pattern_to_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """BuildKit's convertShellPatternToRegex: ``*`` and ``?`` wildcards, ``\\`` escapes, no brackets."""
    out = ["^"] if anchored else []
    star = ".*" if greedy else ".*?"
    i = 0
    while i < len(pattern):
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.append(star)
            continue
        if tok == "?":
            out.append(".")
            continue
        if tok == "\\":
            following = pattern[i] if i < len(pattern) else _EOF
            if following in ("}", "/"):
                continue  # "}" and "/" are escaped for ${}, the escape is not part of the pattern
            out.append("\\")
            tok, i = following, i + 1
            if tok not in ("*", "?", "\\"):
                raise ShellError(f"invalid pattern ({pattern}) in substitution: invalid escape '\\{tok}'")
        elif tok in "[]{}.+()|^$":
            out.append("\\")
        out.append(tok)
    return re.compile("".join(out))


def go_expand(template: str, m: re.Match[str]) -> str:
    """Go's Regexp.Expand for ``ReplaceAllString`` templates: ``$$``, ``$0``, ``$name``/``${name}``."""
    out: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        rest = template[i + 1 :]
        if rest.startswith("$"):
            out.append("$")
            i += 2
            continue
        braced = re.match(r"\{([A-Za-z0-9_]+)\}", rest)
        plain = re.match(r"[A-Za-z0-9_]+", rest)
        match = braced or plain
        if match is None:
            out.append("$")  # malformed: the $ is literal
            i += 1
            continue
        name = match.group(1) if braced else match.group(0)
        if name.isdigit() and int(name) == 0:
            out.append(m.group(0))
        i += 1 + match.end()
    return "".join(out)


def trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    m = pattern_to_regex(pattern, greedy=greedy, anchored=True).search(value)
    return value if m is None else value[m.end() :]


def reverse_pattern(pattern: str) -> str:
    out = [""] * len(pattern)
    last = len(pattern) - 1
    i = 0
    while i <= last:
        tok = pattern[i]
        j = last - i
        if tok == "\\" and i != last:
            out[j - 1] = tok
            out[j] = pattern[i + 1]
            i += 2
        else:
            out[j] = tok
            i += 1
    return "".join(out)


def trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # Shortest/longest rightmost match: reverse both and search leftmost, as BuildKit does.
    return trim_prefix(reverse_pattern(pattern), value[::-1], greedy)[::-1]
