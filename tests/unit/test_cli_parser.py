"""imgci's command line: a command line that names a command gets a parser with only that command's sub-parser
(``build_parser(only)``), which has to parse it exactly as the whole parser does; anything else gets the whole one."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from imgci.cli import COMMANDS, _common, build_parser, command_index
from tests.conftest import REPO


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def test_commands_names_every_sub_parser() -> None:
    assert _commands(build_parser()) == set(COMMANDS)
    for command in COMMANDS:
        assert _commands(build_parser(command)) <= set(COMMANDS)
        assert command in _commands(build_parser(command))


ARGVS = [
    ["push", "example.org/a:1"],
    ["--state", "/tmp/s", "--progress", "plain", "push", "a:1", "b:2"],
    ["-d", "--insecure-registry", "h:5000", "pull", "--platform", "linux/arm64", "busybox"],
    ["build", "-t", "x:1", "--build-arg", "A=1", "--no-cache", "."],
    ["ls", "-q", "--digests", "-f", "reference=x*"],
    ["save", "-o", "out.tar", "--format", "oci", "a", "b"],
    ["import", "-c", 'CMD ["sh"]', "-", "n:1"],
    ["prune", "--keep-storage", "5g", "--filter", "until=24h"],
    ["login", "-u", "me", "--password-stdin", "h:5000"],
    ["run", "build.yaml", "--no-push"],
    ["plan", "build.yaml"],
    ["schema"],
    ["doctor"],
    ["fsck"],
    ["version"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a))
def test_the_one_command_parser_parses_as_the_whole_one(argv: list[str]) -> None:
    i = command_index(argv, _common())
    assert i is not None
    command = argv[i]
    assert command in COMMANDS
    whole = vars(build_parser().parse_args(argv))
    one = vars(build_parser(command).parse_args(argv))
    assert one == whole


def test_the_command_is_found_past_global_options_and_their_values() -> None:
    def command(argv: list[str]) -> str | None:
        i = command_index(argv, _common())
        return None if i is None else argv[i]

    assert command(["--state", "push", "ls"]) == "ls"
    assert command(["-s", "/x", "-d", "--retries", "3", "push", "a"]) == "push"
    assert command(["--state=/x", "version"]) == "version"
    assert command(["--insecure-registry", "build", "pull", "x"]) == "pull"
    assert command(["-d", "--progress", "json"]) is None
    assert command([]) is None


def _imgci(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgci", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_help_and_unknown_commands_still_see_every_command() -> None:
    helped = _imgci("--help")
    assert helped.returncode == 0
    for command in COMMANDS:
        assert command in helped.stdout
    typo = _imgci("pusj", "a:1")
    assert typo.returncode == 2
    assert "invalid choice: 'pusj'" in typo.stderr
    assert "push" in typo.stderr  # the choices listed
    bare = _imgci()
    assert bare.returncode == 2
    assert "COMMAND" in bare.stdout


def test_a_command_s_own_help_and_errors() -> None:
    helped = _imgci("push", "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: imgci push ")
    assert "DEST[:TAG]" in helped.stdout
    missing = _imgci("tag", "only-one")
    assert missing.returncode == 2
    assert "imgci tag: error: the following arguments are required: TARGET_IMAGE[:TAG]" in missing.stderr
