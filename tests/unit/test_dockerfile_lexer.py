"""Line-level Dockerfile parsing must match BuildKit's parser: directives, continuations, comments, JSON vs shell
form, builder flags and heredocs (frontend/dockerfile/parser)."""

from __future__ import annotations

import random

import pytest

from imgci.build.dockerfile import (
    CmdInstruction,
    CopyInstruction,
    Heredoc,
    OnbuildInstruction,
    RunInstruction,
    parse_dockerfile,
)
from imgci.build.dockerfile.lexer import continuation_regex, parse_nodes, split_lines
from imgci.build.dockerfile.lineparse import (
    extract_builder_flags,
    heredocs_from_line,
    lstrip_ws,
    new_node,
    parse_heredoc,
    parse_words,
    split_command,
)
from imgci.errors import DockerfileError


def nodes(text: str) -> list[tuple[str, str, int, int]]:
    return [(n.keyword, n.original, n.start, n.end) for n in parse_nodes(text, "Dockerfile").nodes]


def test_lines_comments_blank_lines_and_case_insensitive_keywords() -> None:
    text = "# a comment\n\nfrom alpine\n   # indented comment\n\tRun echo hi   \n"
    assert nodes(text) == [("from", "from alpine", 3, 3), ("Run", "Run echo hi   ", 5, 5)]
    df = parse_dockerfile(text)
    assert isinstance(df.stages[0].instructions[0], RunInstruction)
    assert df.stages[0].instructions[0].original == "Run echo hi"


def test_continuations_keep_inner_whitespace_and_skip_comments_and_empty_lines() -> None:
    text = "FROM a\nRUN echo a \\\n  # a comment inside\n\n   \n  b \\\n c\nRUN x\n"
    parsed = parse_nodes(text, "Dockerfile")
    assert [(n.original, n.start, n.end) for n in parsed.nodes[1:]] == [
        ("RUN echo a   b  c", 2, 7),
        ("RUN x", 8, 8),
    ]
    assert parsed.warnings == ["line 2: empty continuation line (will become an error in a future BuildKit)"]


def test_continuation_at_end_of_file_ends_the_instruction() -> None:
    assert nodes("FROM a\nRUN echo \\\n# trailing\n") == [("FROM", "FROM a", 1, 1), ("RUN", "RUN echo ", 2, 3)]
    assert nodes("FROM a\nRUN x \\") == [("FROM", "FROM a", 1, 1), ("RUN", "RUN x ", 2, 2)]


def test_escaped_escape_at_end_of_line_is_not_a_continuation() -> None:
    # BuildKit's regex needs a non-escape character before the final escape.
    assert nodes("FROM a\nRUN echo \\\\\nRUN b\n")[1:] == [("RUN", "RUN echo \\\\", 2, 2), ("RUN", "RUN b", 3, 3)]


def test_a_lone_escape_line_continues() -> None:
    assert nodes("FROM a\nRUN \\\n\\\n x\n")[1:] == [("RUN", "RUN  x", 2, 4)]


def test_crlf_and_bom() -> None:
    text = "\ufeffFROM a\r\nRUN a \\\r\n b\r\nCMD c\r\n"
    assert nodes(text) == [("FROM", "FROM a", 1, 1), ("RUN", "RUN a  b", 2, 3), ("CMD", "CMD c", 4, 4)]


def test_keyword_alone_on_the_last_line_without_newline() -> None:
    df = parse_dockerfile("FROM a\nCMD")
    cmd = df.stages[0].instructions[0]
    assert isinstance(cmd, CmdInstruction) and cmd.args == () and cmd.prepend_shell


# -- directives ----------------------------------------------------------------------------------------------------


def test_directives_syntax_check_escape_in_any_order() -> None:
    text = "# check=skip=all\n#SYNTAX = docker/dockerfile:1.7\n#  escape=`\nFROM a\nRUN dir c:\\ `\n  && echo\n"
    df = parse_dockerfile(text)
    assert df.directives == {"check": "skip=all", "syntax": "docker/dockerfile:1.7", "escape": "`"}
    assert df.escape == "`"
    assert df.stages[0].instructions[0].original == "RUN dir c:\\   && echo"
    assert any("syntax=docker/dockerfile:1.7" in note for note in df.notes)
    assert any("check=" in note for note in df.notes)


@pytest.mark.parametrize(
    "prefix",
    [
        "\n# escape=`\n",  # a blank line ends the directives
        "# a comment\n# escape=`\n",  # so does any other comment
        "# unknown=x\n# escape=`\n",  # and an unknown directive
        "FROM a\n# escape=`\n",  # and any instruction
    ],
)
def test_directives_only_at_the_very_top(prefix: str) -> None:
    df = parse_dockerfile(prefix + ("" if "FROM" in prefix else "FROM a\n") + "RUN a `\n")
    assert df.escape == "\\"
    assert df.stages[0].instructions[0].original == "RUN a `"


def test_escape_backtick_makes_backslash_literal() -> None:
    df = parse_dockerfile("# escape=`\nFROM a\nRUN echo \\\nRUN b\n")
    assert [i.original for i in df.stages[0].instructions] == ["RUN echo \\", "RUN b"]


def test_duplicate_directive_and_bad_escape_are_errors() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: only one escape parser directive can be used"):
        parse_dockerfile("# escape=`\n# escape=\\\nFROM a\n")
    with pytest.raises(DockerfileError, match=r"^Dockerfile:1: invalid escape token '\$' does not match"):
        parse_dockerfile("# escape=$\nFROM a\n")


# -- JSON vs shell form ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "args", "json"),
    [
        ('CMD ["a", "b c"]', ("a", "b c"), True),
        ("CMD   [ ]", (), True),
        ('CMD ["a", "b"', ('["a", "b"',), False),  # invalid JSON starting with [ falls back to shell form
        ("CMD [a, b]", ("[a, b]",), False),
        ('CMD ["a"] extra', ('["a"] extra',), False),
        ("CMD [NaN]", ("[NaN]",), False),  # Go's JSON rejects NaN, so shell form
        ("CMD echo [1]", ("echo [1]",), False),
        ('CMD ["a\\u0041"]', ("aA",), True),
    ],
)
def test_json_or_shell_form(line: str, args: tuple[str, ...], json: bool) -> None:
    cmd = parse_dockerfile(f"FROM a\n{line}\n").stages[0].instructions[0]
    assert isinstance(cmd, CmdInstruction)
    assert (cmd.args, not cmd.prepend_shell) == (args, json)


def test_json_array_with_non_strings_is_an_error() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:3: when using JSON array syntax, arrays must be compr"):
        parse_dockerfile('FROM a\nRUN x\nRUN ["a", 1]\n')


def test_copy_shell_form_is_split_on_whitespace_only() -> None:
    copy = parse_dockerfile("FROM a\nCOPY \"a b\" 'c' /d/\n").stages[0].instructions[0]
    assert isinstance(copy, CopyInstruction)
    assert copy.sources == ('"a', 'b"', "'c'") and copy.dest == "/d/"
    copy = parse_dockerfile('FROM a\nCOPY ["a b", "/d/"]\n').stages[0].instructions[0]
    assert isinstance(copy, CopyInstruction) and copy.sources == ("a b",) and copy.json


# -- builder flags and words -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("COPY --from=a --chown=1:2 x y", ("COPY", ["--from=a", "--chown=1:2"], "x y")),
        ('COPY --chown="a b" x y', ("COPY", ["--chown=a b"], "x y")),
        ("COPY --chown=a\\ b x", ("COPY", ["--chown=a b"], "x")),
        ("COPY --link -- --x y", ("COPY", ["--link"], "--x y")),
        ("RUN -x", ("RUN", [], "-x")),
        ("RUN --mount=type=cache,target=/c  echo --no", ("RUN", ["--mount=type=cache,target=/c"], "echo --no")),
        ("RUN --a --b", ("RUN", ["--a", "--b"], "")),
        ("CMD", ("CMD", [], "")),
    ],
)
def test_split_command(line: str, expected: tuple[str, list[str], str]) -> None:
    assert split_command(line) == expected


def test_extract_builder_flags_with_quotes() -> None:
    assert extract_builder_flags("--a='x y' --b=\"\" rest") == ("rest", ["--a=x y", "--b="])


@pytest.mark.parametrize(
    ("rest", "escape", "words"),
    [
        ('a=1 b="x y" c', "\\", ["a=1", 'b="x y"', "c"]),
        ("a=x\\ y b", "\\", ["a=x\\ y", "b"]),
        ("a='x \\' y'", "\\", ["a='x \\'", "y'"]),  # no escapes inside single quotes
        ('a="x \\" y"', "\\", ['a="x \\" y"']),
        ("a=x` y", "`", ["a=x` y"]),
        ('""', "\\", ['""']),
        ("trailing\\", "\\", ["trailing"]),
    ],
)
def test_parse_words(rest: str, escape: str, words: list[str]) -> None:
    assert parse_words(rest, escape) == words


# -- heredocs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("<<EOF", Heredoc("EOF", chomp=False, expand=True)),
        ("<<-EOF", Heredoc("EOF", chomp=True, expand=True)),
        ('<<"EOF"', Heredoc("EOF", chomp=False, expand=False)),
        ("<<'EOF'", Heredoc("EOF", chomp=False, expand=False)),
        ('<<-E"O"F', Heredoc("EOF", chomp=True, expand=False)),
        ("3<<EOF", Heredoc("EOF", fd=3)),
        ("<<", None),
        ("<<EOF>x", Heredoc("EOF>x")),
        ("a<<EOF", None),
        ("<<<EOF", None),
        ("<<E F", None),
    ],
)
def test_parse_heredoc_word(word: str, expected: Heredoc | None) -> None:
    assert parse_heredoc(word) == expected


def test_run_heredoc_is_consumed_and_not_parsed_as_instructions() -> None:
    text = "FROM a\nRUN <<EOF\nFROM b\nCOPY x y\nRUN \\\nEOF\nRUN after\n"
    df = parse_dockerfile(text)
    assert len(df.stages) == 1
    run, after = df.stages[0].instructions
    assert isinstance(run, RunInstruction)
    assert run.heredocs == (Heredoc("EOF", "FROM b\nCOPY x y\nRUN \\\n"),)
    assert run.location.start == 2 and run.location.end == 6 and run.original == "RUN <<EOF"
    assert after.original == "RUN after" and after.location.start == 7


def test_several_heredocs_on_one_instruction_and_chomping() -> None:
    text = 'FROM a\nRUN <<A cat - /dev/fd/3 3<<-"B"\none\nA\n\ttwo\n\t\tB\nCMD x\n'
    run = parse_dockerfile(text).stages[0].instructions[0]
    assert isinstance(run, RunInstruction)
    assert run.heredocs == (Heredoc("A", "one\n"), Heredoc("B", "\ttwo\n", chomp=True, expand=False, fd=3))
    assert run.location.end == 6
    assert run.script().args == ('<<A cat - /dev/fd/3 3<<-"B"\none\nA\n\ttwo\nB',)


def test_heredoc_body_blank_lines_comments_and_crlf_are_kept() -> None:
    text = "FROM a\nRUN <<EOF\r\n# not a comment\r\n\r\n  \\\r\nEOF\r\nCMD x\n"
    run, cmd = parse_dockerfile(text).stages[0].instructions
    assert isinstance(run, RunInstruction)
    assert run.heredocs[0].content == "# not a comment\r\n\r\n  \\\r\n"
    assert cmd.location.start == 7


def test_heredoc_after_a_continued_line() -> None:
    run = parse_dockerfile("FROM a\nRUN --network=none \\\n  cat <<EOF\nbody\nEOF\n").stages[0].instructions[0]
    assert isinstance(run, RunInstruction)
    assert run.heredocs[0].content == "body\n" and (run.location.start, run.location.end) == (2, 5)


def test_heredoc_markers_inside_quotes_json_or_other_instructions_are_not_heredocs() -> None:
    df = parse_dockerfile('FROM a\nRUN echo "<<EOF"\nRUN ["cat", "<<EOF"]\nENV A=<<EOF\nCMD cat <<EOF\n')
    for instruction in df.stages[0].instructions:
        assert not getattr(instruction, "heredocs", ())
    assert len(df.stages[0].instructions) == 4


def test_unterminated_heredoc() -> None:
    with pytest.raises(DockerfileError, match=r'^Dockerfile:3: unterminated heredoc "EOF"'):
        parse_dockerfile("FROM a\nRUN x\nRUN <<EOF\nbody\nEO\n EOF\n")
    with pytest.raises(DockerfileError, match=r'^Dockerfile:2: unterminated heredoc "B"'):
        parse_dockerfile("FROM a\nCOPY <<A <<B /x\na\nA\nb\n")


def test_chomp_terminator_may_be_tab_indented_but_plain_one_may_not() -> None:
    with pytest.raises(DockerfileError, match="unterminated heredoc"):
        parse_dockerfile("FROM a\nRUN <<EOF\nx\n\tEOF\n")
    run = parse_dockerfile("FROM a\nRUN <<-EOF\nx\n\t\tEOF\n").stages[0].instructions[0]
    assert isinstance(run, RunInstruction) and run.heredocs[0].content == "x\n"


def test_onbuild_heredoc_is_part_of_the_trigger_expression() -> None:
    onbuild = parse_dockerfile("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n").stages[0].instructions[0]
    assert isinstance(onbuild, OnbuildInstruction)
    assert onbuild.expression == "RUN <<EOF\necho hi\nEOF"
    assert isinstance(onbuild.trigger, RunInstruction)
    assert onbuild.trigger.heredocs == (Heredoc("EOF", "echo hi\n"),)


def test_copy_heredoc_creates_a_file_and_ordinary_sources_stay() -> None:
    text = "FROM a\nCOPY <<-one src <<'two' /dest/\n\tline $X\none\n$Y\ntwo\n"
    copy = parse_dockerfile(text).stages[0].instructions[0]
    assert isinstance(copy, CopyInstruction)
    assert copy.sources == ("src",)
    assert [tuple(c) for c in copy.contents] == [("one", "line $X\n", True), ("two", "$Y\n", False)]
    assert copy.dest == "/dest/"


def test_heredoc_as_copy_destination_is_an_error() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: COPY cannot accept a heredoc as a destination"):
        parse_dockerfile("FROM a\nCOPY x <<EOF\nbody\nEOF\n")


# -- differential check: dockerfile-parse grouping == BuildKit's scanner loop ---------------------------------------


def buildkit_scanner(text: str, escape: str) -> list[tuple[str, int, int, list[str]]] | str:
    """A direct port of BuildKit's Parse loop (no directives), the reference for the skeleton approach."""
    lines = split_lines(text)
    cont = continuation_regex(escape)

    def trim(line: str) -> tuple[str, bool]:
        m = cont.search(line)
        return (line, True) if m is None else (line[: m.start()] + (m.group(1) or ""), False)

    out: list[tuple[str, int, int, list[str]]] = []
    i = 0
    while i < len(lines):
        first = lstrip_ws(lines[i].rstrip("\r\n"))
        i += 1
        start = i
        line, eol = trim("" if first.startswith("#") else first)
        if eol and not line:
            continue
        while not eol and i < len(lines):
            body = lines[i].rstrip("\r\n")
            i += 1
            if lstrip_ws(body).startswith("#") or not lstrip_ws(body):
                continue
            piece, eol = trim(body)
            line += piece
        bodies = []
        if new_node(line, escape).can_contain_heredoc() and "<<" in line:
            for doc in heredocs_from_line(line):
                content = []
                while True:
                    if i >= len(lines):
                        return "unterminated"
                    raw = lines[i]
                    i += 1
                    candidate = raw.rstrip("\r\n")
                    if (candidate.lstrip("\t") if doc.chomp else candidate) == doc.name:
                        break
                    content.append(raw)
                bodies.append("".join(content))
        out.append((line, start, i, bodies))
    return out


FRAGMENTS = [
    "RUN a",
    "RUN a \\",
    "COPY x y `",
    "\\",
    "  \\  ",
    "`",
    "# comment \\",
    "  # indented",
    "",
    "   ",
    "echo b\\\\",
    "x \\\\\\",
    "COPY <<EOF /x",
    "RUN <<-E cat \\",
    "RUN cat <<'Q' <<R",
    "EOF",
    "\tE",
    "E",
    "Q",
    "R",
    "  y",
    "CMD c \r",
    "EOF",
    "Q",
    "R",
    "\x1c#x",
    "\u00a0\\",
]


@pytest.mark.parametrize("escape", ["\\", "`"])
def test_grouping_matches_buildkit_scanner_on_random_files(escape: str) -> None:
    rng = random.Random(20240601)
    for _ in range(400):
        text = "\n".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.5:
            text += "\n"
        if escape == "`":
            text = "# escape=`\n" + text
        expected = buildkit_scanner(text, escape)
        try:
            parsed = parse_nodes(text, "Dockerfile")
        except DockerfileError as e:
            assert expected == "unterminated" and "unterminated heredoc" in str(e), text
            continue
        got = [(n.original, n.start, n.end, [h.content for h in n.heredocs]) for n in parsed.nodes]
        assert got == expected, text
