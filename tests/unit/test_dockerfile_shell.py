"""Variable substitution must match BuildKit's shell lexer (frontend/dockerfile/shell): the cases follow the
semantics of its envVarTest/wordsTest tables and lex_test.go, written out here."""

from __future__ import annotations

import pytest

from imgci.build.dockerfile import expand_word, expand_words
from imgci.build.dockerfile.shell import ShellError, ShellLexer
from imgci.errors import DockerfileError

ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": "", "SPACED": "a  b ", "FOO": "xxyy"}

ERROR = object()


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        # quoting and escapes
        ("hello", "hello"),
        ("he'll'o", "hello"),
        ("he'llo", ERROR),
        ("he\\'llo", "he'llo"),
        ("he\\\\'llo", ERROR),
        ("abc\\tdef", "abctdef"),
        ('"abc\\tdef"', "abc\\tdef"),
        ('"abc\\\\tdef"', "abc\\tdef"),
        ("'abc\\tdef'", "abc\\tdef"),
        ("hello\\", "hello"),
        ("hello\\\\", "hello\\"),
        ('"hello', ERROR),
        ('"hello\\"', ERROR),
        ('"hel\'lo"', "hel'lo"),
        ("'hello", ERROR),
        ("'hello\\'", "hello\\"),
        ("\"''\"", "''"),
        ("'\"x\"'", '"x"'),
        ("a  b", "a  b"),
        # plain variables
        ("$.", "$."),
        ("$", "$"),
        ("he$1x", "hex"),
        ("he$.x", "he$.x"),
        ("he$pwd.", "he."),
        ("he$PWD", "he/home"),
        ("he\\$PWD", "he$PWD"),
        ("he\\\\$PWD", "he\\/home"),
        ('"he\\$PWD"', "he$PWD"),
        ('"he\\\\$PWD"', "he\\/home"),
        ("'he$PWD'", "he$PWD"),
        ("\"he'$PWD'\"", "he'/home'"),
        ("$PWD$SHELL", "/homebash"),
        ("${KOREAN}", "한국어"),
        ("안녕${KOREAN}", "안녕한국어"),
        ("$$", ""),
        ("$@x", "x"),
        # braces
        ("\\${}", "${}"),
        ("he\\${}xx", "he${}xx"),
        ("${}", ERROR),
        ("he${}xx", ERROR),
        ("he${hi}xx", "hexx"),
        ("he${PWD}", "he/home"),
        ("he${.}", ERROR),
        ("he${PWD", ERROR),
        ("${:x}", ERROR),
        ("${{x}", ERROR),
        # defaults and alternatives
        ("he${XXX:-000}xx", "he000xx"),
        ("he${PWD:-000}xx", "he/homexx"),
        ("he${XXX:-$PWD}xx", "he/homexx"),
        ("he${XXX:-${YYY:-yyy}}xx", "heyyyxx"),
        ("${NULL:-x}", "x"),
        ("${NULL-x}", ""),
        ("${XXX-x}", "x"),
        ("he${XXX:+${PWD}}xx", "hexx"),
        ("he${PWD:+${SHELL}}xx", "hebashxx"),
        ("${NULL:+x}", ""),
        ("${NULL+x}", "x"),
        ("he${PWD+${PWD}:}xx", "he/home:xx"),
        ("he${XXX:-\\$PWD:}xx", "he$PWD:xx"),
        ('he${XXX:-"wo"rld}xx', "heworldxx"),
        ("he${XXX:-'wo\"rld'}xx", 'hewo"rldxx'),
        ("he${XXX:-'wo}rld'}xx", "hewo}rldxx"),
        ('he${XXX:-"wo}rld"}xx', "hewo}rldxx"),
        ("he${XXX:-\\}rld}xx", "he}rldxx"),
        # required
        ("he${PWD?}", "he/home"),
        ("he${PWD:?}", "he/home"),
        ("he${NULL?}", "he"),
        ("he${NULL:?}", ERROR),
        ("he${XXX?}", ERROR),
        ("he${XXX:?}", ERROR),
        # unsupported forms are errors, as in BuildKit
        ("he${XXX:YYY}", ERROR),
        ("he${PWD=000}xx", ERROR),
        ("${#PWD}", ERROR),
        ("${PWD:=x}", ERROR),
        # patterns
        ("${PWD#/}", "home"),
        ("${PWD##*/}", "home"),
        ("${PWD%/*}", ""),
        ("${SHELL%?}", "bas"),
        ("${FOO#*x*y}", "y"),
        ("${FOO#*}", "xxyy"),
        ("${FOO##*x}", "yy"),
        ("${FOO#}", "xxyy"),
        ("${FOO%y*}", "xxy"),
        ("${FOO%%y*}", "xx"),
        ("${FOO#$NULL}", "xxyy"),
        ("${FOO#\\x}", ERROR),  # only *, ? and \ may be escaped in a pattern
        ("${SHELL/a/A}", "bAsh"),
        ("${FOO/y/Y}", "xxYy"),
        ("${FOO//y/Y}", "xxYY"),
        ("${FOO//x}", ERROR),
        ("${FOO///}", "xxyy"),
        ("${XXX/a/b}", ""),
        ("${PWD//\\//\\/}", "\\/home"),
        ("${FOO//?/.}", "...."),
        ("${FOO/*/z}", "z"),
    ],
)
def test_expand_word(word: str, expected: object) -> None:
    if expected is ERROR:
        with pytest.raises(DockerfileError):
            expand_word(word, ENV)
    else:
        assert expand_word(word, ENV) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("a b  c", ["a", "b", "c"]),
        ('a "b c" d', ["a", "b c", "d"]),
        ("a 'b c'", ["a", "b c"]),
        ("$SPACED", ["a", "b"]),  # values from variables are split
        ('"$SPACED"', ["a  b "]),  # quoted ones are not
        ('x"$SPACED"', ["xa  b "]),
        ("a\\ b", ["a b"]),
        ('"" a ""', ["a"]),  # empty words are dropped
        ("$NULL", []),
        ('d${XXX:-"e f"}', ["de", "f"]),  # a ${} result is split even if it was quoted inside
        ("  ", []),
    ],
)
def test_expand_words(word: str, expected: list[str]) -> None:
    assert expand_words(word, ENV) == expected


def test_required_variable_message_and_location() -> None:
    with pytest.raises(DockerfileError) as info:
        expand_word("${X:?set X please}", {}, file="df", line=7)
    assert str(info.value) == 'df:7: failed to process "${X:?set X please}": X: set X please'
    with pytest.raises(DockerfileError, match="X: is not allowed to be unset"):
        expand_word("${X?}", {})
    with pytest.raises(DockerfileError, match="X: is not allowed to be empty"):
        expand_word("${X:?}", {"X": ""})
    with pytest.raises(DockerfileError, match=r"message herex$"):
        expand_word("${VAR:?message here$ARG}", {"ARG": "x"})


def test_backtick_escape() -> None:
    assert expand_word("a`$b", {"b": "B"}, escape="`") == "a$b"
    assert expand_word("c:\\x`$b", {"b": "B"}, escape="`") == "c:\\x$b"
    assert expand_word('"`""', {}, escape="`") == '"'


def test_lexer_modes_used_by_the_parser() -> None:
    raw = ShellLexer("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True)
    assert raw.process("cat <<'EOF' $X ${Y:-z} \\a", {})[1] == ["cat", "<<'EOF'", "$X", "${Y:-z}", "\\a"]
    heredoc_body = ShellLexer("\\", skip_process_quotes=True)
    assert heredoc_body.process('it\'s "$A" \\$B \\n', {"A": "1"})[0] == 'it\'s "1" $B n'


def test_matched_variables_are_recorded() -> None:
    lexer = ShellLexer()
    lexer.process("$A ${B:-x} $C", {"A": "1", "B": "2"})
    assert lexer.matched == {"A", "B"}


def test_shell_error_carries_buildkit_message() -> None:
    with pytest.raises(ShellError, match=r"unexpected end of statement while looking for matching double-quote"):
        ShellLexer().process('"open', {})
    with pytest.raises(ShellError, match=r"syntax error: bad substitution"):
        ShellLexer().process("${}", {})
    with pytest.raises(ShellError, match=r"unsupported modifier \(:Y\) in substitution"):
        ShellLexer().process("${X:Y}", {})
