"""dockerignore: parsing like ignorefile.ReadAll, matching like moby/patternmatcher, Go's filepath.Match."""

from __future__ import annotations

import pytest

from imgci.build.dockerignore import (
    BadPatternError,
    Matcher,
    Pattern,
    go_clean,
    go_match,
    has_wildcards,
    parse_dockerignore,
)
from imgci.errors import BuildError


def test_parse_strips_comments_blank_lines_slashes_and_bom() -> None:
    text = (
        "\ufefftest1\n/test2\n/a/file/here\n\nlastfile\n# comment\n  # not a comment\n"
        "! /inverted/abs/path\n!\n! \n./dot/./x/\n"
    )
    assert parse_dockerignore(text) == [
        "test1",
        "test2",
        "a/file/here",
        "lastfile",
        "# not a comment",  # only lines *starting* with # are comments
        "!inverted/abs/path",
        "!",
        "!",
        "dot/x",
    ]


def test_parse_bytes_and_root_slash() -> None:
    assert parse_dockerignore(b"/\n//x//y/\n**/*.pyc\r\n") == ["/", "x/y", "**/*.pyc"]


# (pattern, path, exact match, match with parents) — moby/patternmatcher's TestMatches table plus our own.
CASES = [
    ("**", "file", True, True),
    ("**", "file/", True, True),
    ("**/", "file", True, True),
    ("**", "dir/file", True, True),
    ("**/**", "dir/file", True, True),
    ("dir/**", "dir/file", True, True),
    ("dir/**", "dir/dir2/file", True, True),
    ("**/dir", "dir", True, True),
    ("**/dir", "dir/file", False, True),
    ("**/dir2/*", "dir/dir2/file", True, True),
    ("**/dir2/*", "dir/dir2/file/", False, True),
    ("**/dir2/**", "dir/dir2/dir3/file", True, True),
    ("**file", "file", True, True),
    ("**file", "dir/file", True, True),
    ("**/file", "dir/dir/file", True, True),
    ("**/file*", "dir/dir/file.txt", True, True),
    ("**/file*txt", "dir/dir/file.txt", True, True),
    ("**/**/*.txt", "dir/dir/file.txt", True, True),
    ("**/**/*.txt2", "dir/dir/file.txt", False, False),
    ("**/*.txt", "file.txt", True, True),
    ("a**/*.txt", "a/dir/dir/file.txt", True, True),
    ("a/*.txt", "a/dir/file.txt", False, False),
    ("a/*.txt", "a/file.txt", True, True),
    ("a/*.txt**", "a/file.txt", True, True),
    ("a[b-d]e", "ae", False, False),
    ("a[b-d]e", "ace", True, True),
    ("a[^b-d]e", "aze", True, True),
    (".*", ".foo", True, True),
    (".*", "foo", False, False),
    ("abc.def", "abcdef", False, False),
    ("abc?def", "abcZdef", True, True),
    ("abc?def", "abcdef", False, False),
    ("**/foo/bar", "dir/dir2/foo/bar", True, True),
    ("abc/**", "abc", False, False),
    ("abc/**", "abc/def/ghi", True, True),
    ("**/.foo", "bar.foo", False, False),
    ("a(b)c/def", "a(b)c/def", True, True),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True, True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True, True),
    ("a\\\\", "a\\", True, True),
    ("a\\*b", "a*b", True, True),
    ("a\\*b", "azb", False, False),
    ("docs", "docs/sub/README.md", False, True),
    ("*", "dir/file", False, True),
    ("*/tmp/*", "x/tmp/a/b", False, True),
    ("[[]x", "[x", True, True),
]


@pytest.mark.parametrize(("pattern", "path", "exact", "with_parents"), CASES)
def test_pattern_table(pattern: str, path: str, exact: bool, with_parents: bool) -> None:
    assert Pattern(go_clean(pattern), False).match(path) is exact  # patterns are cleaned first
    assert Matcher([pattern]).matches(path) is with_parents


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
        (["*.go", "!fileutils.go"], "fileutils.go", False),
        (["!fileutils.go", "*.go"], "fileutils.go", True),
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["docs", "!docs/README.md"], "docs/other.md", True),
        (["docs/", "!docs/README.md"], "docs/README.md", False),
        (["docs/*", "!docs/README.md"], "docs/README.md", False),
        (["*", "!keep", "keep/secret"], "keep/secret/x", True),
        (["*", "!keep", "keep/secret"], "keep/other", False),
        ([], "anything", False),
    ],
)
def test_last_match_wins(patterns: list[str], path: str, excluded: bool) -> None:
    assert Matcher(patterns).matches(path) is excluded


def test_root_is_never_excluded() -> None:
    assert Matcher(["*"]).matches("") is False
    assert Matcher(["**"]).matches("/") is False


@pytest.mark.parametrize("bad", ["[", "a[", "[^", "[^bc", "[]a]", "[-]", "[x-]", "[a-b-c]", "\\", "!"])
def test_malformed_patterns_name_their_source(bad: str) -> None:
    with pytest.raises(BuildError, match=r"\.dockerignore"):
        Matcher(["ok", bad])


def test_can_skip_dir() -> None:
    plain = Matcher(["node_modules", "build/"])
    assert plain.can_skip_dir("node_modules")
    assert not plain.can_skip_dir("src")  # not excluded: must be walked
    exceptions = Matcher(["vendor", "!vendor/keep/this.go", "logs"])
    assert not exceptions.can_skip_dir("vendor")
    assert not exceptions.can_skip_dir("vendor/keep")
    assert exceptions.can_skip_dir("vendor/other")
    assert exceptions.can_skip_dir("logs")
    wild = Matcher(["*", "!**/*.go"])  # an exception with wildcards could match anywhere
    assert not wild.can_skip_dir("anything")


def test_may_include_below() -> None:
    include = Matcher(["a/b/c.txt"])
    assert include.may_include_below("a")
    assert include.may_include_below("a/b")
    assert not include.may_include_below("x")
    assert Matcher(["**/*.txt"]).may_include_below("x")


# Go's filepath.Match tests (path/filepath/match_test.go), the ones that apply on Unix.
GO_MATCH = [
    ("abc", "abc", True),
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ab/c", False),
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True),
    ("a*b?c*x", "abxbbxdbxebxczzy", False),
    ("ab[c]", "abc", True),
    ("ab[b-d]", "abc", True),
    ("ab[e-g]", "abc", False),
    ("ab[^c]", "abc", False),
    ("ab[^b-d]", "abc", False),
    ("ab[^e-g]", "abc", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "ab", False),
    ("a?b", "a☺b", True),
    ("a[^a]b", "a☺b", True),
    ("a???b", "a☺b", False),
    ("[a-ζ]*", "\u03b1", True),  # alpha
    ("*[a-ζ]", "A", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("[\\]a]", "]", True),
    ("[\\-]", "-", True),
    ("[x\\-]", "x", True),
    ("[x\\-]", "-", True),
    ("[x\\-]", "z", False),
    ("[\\-x]", "x", True),
    ("*x", "xxx", True),
]


@pytest.mark.parametrize(("pattern", "name", "matched"), GO_MATCH)
def test_go_match(pattern: str, name: str, matched: bool) -> None:
    assert go_match(pattern, name) is matched


@pytest.mark.parametrize(("pattern", "name"), [("[]a]", "]"), ("[-]", "-"), ("[x-]", "x"), ("\\", "a"), ("[", "a")])
def test_go_match_bad_pattern(pattern: str, name: str) -> None:
    with pytest.raises(BadPatternError):
        go_match(pattern, name)


def test_has_wildcards() -> None:
    assert has_wildcards("*.go") and has_wildcards("a?") and has_wildcards("[ab]")
    assert not has_wildcards("plain.txt") and not has_wildcards("a\\*b")
