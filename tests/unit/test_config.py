"""build.yaml loading: the example from the docs, matrix/inherits/defaults/groups semantics, --only and --set, every
error kind with its exact file:line and field, tag templates, the JSON schema and the CI shard documents."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from imgci.config import ConfigError, Location, Plan, json_schema, load_plan, plan_document
from imgci.errors import UsageError

SHA = "0123456789abcdef0123456789abcdef01234567"
# Local provider (tmp_path is no git repository) with the values forced the way odd CI systems do it.
ENV = {"IMGCI_CI_SHA": SHA, "IMGCI_CI_BRANCH": "main", "IMGCI_CI_DEFAULT_BRANCH": "main"}

EXAMPLE = """\
version: 1
defaults:
  platforms: [linux/amd64]
  push: true
  cache_from: ["type=registry,ref=ghcr.io/acme/app:buildcache"]
  cache_to: ["type=registry,ref=ghcr.io/acme/app:buildcache,mode=max"]
targets:
  app:
    context: .
    dockerfile: Dockerfile
    target: runtime
    args: {PYTHON_VERSION: "${{ matrix.python }}"}
    tags: ["ghcr.io/acme/app:${{ matrix.python }}-{{short_sha}}", "ghcr.io/acme/app:${{ matrix.python }}"]
    matrix:
      python: ["3.11", "3.12"]
      exclude: []
  docs:
    context: .
    target: docs
    tags: ["ghcr.io/acme/docs:{{branch}}"]
groups:
  default: [app, docs]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    path = tmp_path / "build.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: object) -> Plan:
    write(tmp_path, text)
    return load_plan(Path("build.yaml"), cwd=tmp_path, env=ENV if env is None else env, **kw)  # type: ignore[arg-type]


def error(tmp_path: Path, text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kw)
    return info.value


def targets(body: str) -> str:
    """A version-1 file with ``body`` (indented two spaces) under targets:."""
    return "version: 1\ntargets:\n" + textwrap.indent(textwrap.dedent(body), "  ")


# --- the example ------------------------------------------------------------------------------------------------


def test_example_loads_into_three_entries(tmp_path: Path) -> None:
    plan = load(tmp_path, EXAMPLE)
    assert [e.id for e in plan.entries] == ["app-3.11", "app-3.12", "docs"]
    app, _, docs = plan.entries
    assert app.label == "app (python=3.11)"
    assert app.matrix == {"python": "3.11"}
    assert app.args == {"PYTHON_VERSION": "3.11"}
    assert app.tags == ["ghcr.io/acme/app:3.11-0123456", "ghcr.io/acme/app:3.11"]
    assert app.stage == "runtime"
    assert app.context == tmp_path.resolve()
    assert app.dockerfile == tmp_path.resolve() / "Dockerfile"
    assert app.platforms == ["linux/amd64"]
    assert app.push is True
    assert app.cache_to == ["type=registry,ref=ghcr.io/acme/app:buildcache,mode=max"]
    assert app.location == Location("build.yaml", 8, "targets.app")
    assert app.field_locations["tags"] == Location("build.yaml", 13, "targets.app.tags")
    assert app.field_locations["platforms"] == Location("build.yaml", 3, "defaults.platforms")
    assert docs.label == "docs"
    assert docs.tags == ["ghcr.io/acme/docs:main"]
    assert plan.groups == {"default": ["app", "docs"]}
    assert plan.ci.short_sha == "0123456"
    assert plan.path == tmp_path / "build.yaml"


def test_example_with_a_fake_github_env(tmp_path: Path) -> None:
    env = {"GITHUB_ACTIONS": "true", "GITHUB_REF": "refs/heads/feature/Foo#1", "GITHUB_SHA": SHA}
    plan = load(tmp_path, EXAMPLE, env=env)
    assert plan.entries[0].tags[0] == "ghcr.io/acme/app:3.11-0123456"
    assert plan.entries[2].tags == ["ghcr.io/acme/docs:feature-Foo-1"]  # sanitised


def test_null_target_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "Dockerfile").write_text("FROM scratch\n")
    plan = load(tmp_path, targets("docs:\nsub:\n  context: sub\n"))
    docs, sub = plan.entries
    assert (docs.push, docs.tags, docs.platforms, docs.stage, docs.args) == (False, [], [], None, {})
    assert sub.dockerfile == tmp_path.resolve() / "sub" / "Dockerfile"
    assert docs.field_locations["dockerfile"] == Location("build.yaml", 3, "targets.docs.dockerfile")


def test_numbers_become_their_yaml_text(tmp_path: Path) -> None:
    plan = load(
        tmp_path, targets("a:\n  args: {V: 3.10, N: 7, B: true}\n  labels: {x: 1.0}\n  matrix:\n    py: [3.10, 3.9]\n")
    )
    assert [e.matrix for e in plan.entries] == [{"py": "3.10"}, {"py": "3.9"}]
    assert plan.entries[0].args == {"V": "3.10", "N": "7", "B": "true"}
    assert plan.entries[0].labels == {"x": "1.0"}
    assert [e.id for e in plan.entries] == ["a-3.10", "a-3.9"]


# --- matrix -----------------------------------------------------------------------------------------------------


def matrix_of(tmp_path: Path, matrix: str) -> list[dict[str, str]]:
    plan = load(tmp_path, targets("a:\n  matrix:\n" + textwrap.indent(textwrap.dedent(matrix), "    ")))
    return [e.matrix for e in plan.entries]


def test_matrix_product_in_key_order(tmp_path: Path) -> None:
    assert matrix_of(tmp_path, "os: [x, y]\npy: ['1', '2']\n") == [
        {"os": "x", "py": "1"},
        {"os": "x", "py": "2"},
        {"os": "y", "py": "1"},
        {"os": "y", "py": "2"},
    ]


def test_matrix_exclude_matches_all_given_keys(tmp_path: Path) -> None:
    got = matrix_of(tmp_path, "os: [x, y]\npy: ['1', '2']\nexclude:\n  - {os: x, py: '2'}\n  - {os: y}\n")
    assert got == [{"os": "x", "py": "1"}]


def test_matrix_include_extends_matching_entries(tmp_path: Path) -> None:
    got = matrix_of(tmp_path, "py: ['1', '2']\ninclude:\n  - {py: '2', extra: yes}\n  - {flag: on}\n")
    assert got == [{"py": "1", "flag": "on"}, {"py": "2", "extra": "yes", "flag": "on"}]


def test_matrix_include_adds_new_entries(tmp_path: Path) -> None:
    got = matrix_of(tmp_path, "py: ['1']\nos: [x]\ninclude:\n  - {py: '3', os: z}\n  - {py: '1', os: w}\n")
    assert got == [{"py": "1", "os": "x"}, {"py": "3", "os": "z"}, {"py": "1", "os": "w"}]


def test_matrix_include_puts_back_an_excluded_entry(tmp_path: Path) -> None:
    got = matrix_of(tmp_path, "py: ['1', '2']\nexclude: [{py: '2'}]\ninclude: [{py: '2'}]\n")
    assert got == [{"py": "1"}, {"py": "2"}]


def test_matrix_of_includes_only(tmp_path: Path) -> None:
    plan = load(
        tmp_path, targets("a:\n  tags: ['x:${{ matrix.v }}']\n  matrix:\n    include: [{v: '1'}, {v: '2', w: q}]\n")
    )
    assert [(e.id, e.label, e.tags) for e in plan.entries] == [
        ("a-1", "a (v=1)", ["docker.io/library/x:1"]),
        ("a-2-q", "a (v=2, w=q)", ["docker.io/library/x:2"]),
    ]


def test_matrix_variable_only_some_entries_have_is_empty(tmp_path: Path) -> None:
    plan = load(
        tmp_path,
        targets(
            "a:\n  args: {E: '${{matrix.extra}}'}\n  matrix:\n    py: ['1', '2']\n    include: [{py: '2', extra: x}]\n"
        ),
    )
    assert [e.args for e in plan.entries] == [{"E": ""}, {"E": "x"}]


def test_matrix_ids_fall_back_to_key_names_on_collision(tmp_path: Path) -> None:
    text = targets("t:\n  matrix:\n    x: ['1', '']\n    y: ['', '1']\n    exclude: [{x: '', y: ''}]\n")
    assert [e.id for e in load(tmp_path, text).entries] == ["t-x-1-y", "t-x-1-y-1", "t-x-y-1"]


def test_matrix_ids_that_still_collide_are_an_error(tmp_path: Path) -> None:
    e = error(tmp_path, targets("a:\n  matrix:\n    v: ['x y', 'x-y']\n"))
    assert (
        str(e)
        == "build.yaml:4: targets.a.matrix: two matrix entries (or a target and an entry) would both be named 'a-v-x-y'"
    )


def test_matrix_ids_avoid_other_target_names(tmp_path: Path) -> None:
    plan = load(tmp_path, targets("a:\n  matrix:\n    py: ['1']\na-1:\n"))
    assert [e.id for e in plan.entries] == ["a-py-1", "a-1"]


def test_matrix_keys_and_values_substitute_everywhere(tmp_path: Path) -> None:
    plan = load(
        tmp_path,
        targets(
            "a:\n  target: 'stage-${{ matrix.s }}'\n  args: {'K_${{matrix.s}}': v}\n"
            "  platforms: ['linux/${{ matrix.arch }}']\n"
            "  matrix: {s: [one], arch: [arm64]}\n"
        ),
    )
    entry = plan.entries[0]
    assert (entry.stage, entry.args, entry.platforms) == ("stage-one", {"K_one": "v"}, ["linux/arm64"])


def test_matrix_value_templates_are_expanded_after_the_matrix(tmp_path: Path) -> None:
    plan = load(tmp_path, targets("a:\n  tags: ['x:${{ matrix.t }}']\n  matrix: {t: ['{{branch}}-1']}\n"))
    assert plan.entries[0].tags == ["docker.io/library/x:main-1"]


# --- inherits, defaults, groups -------------------------------------------------------------------------------------


def test_inherits_merges_maps_and_replaces_lists(tmp_path: Path) -> None:
    plan = load(
        tmp_path,
        """\
        version: 1
        defaults:
          args: {D: d, A: from-defaults}
          labels: {l: '1'}
          platforms: [linux/amd64]
        targets:
          base:
            args: {A: base, B: base}
            tags: [base:1]
            platforms: [linux/arm64]
          other:
            args: {C: other}
            tags: [other:1]
          app:
            inherits: [base, other]
            args: {B: app}
            labels: {m: '2'}
        """,
        only=["app"],
    )
    (app,) = plan.entries
    assert app.args == {"D": "d", "A": "base", "B": "app", "C": "other"}
    assert app.labels == {"l": "1", "m": "2"}
    assert app.tags == ["docker.io/library/other:1"]
    assert app.platforms == ["linux/arm64"]
    assert app.field_locations["tags"] == Location("build.yaml", 13, "targets.other.tags")
    assert app.field_locations["args"] == Location("build.yaml", 16, "targets.app.args")


def test_inherited_dockerfile_inline_is_replaced_by_a_dockerfile(tmp_path: Path) -> None:
    plan = load(
        tmp_path,
        targets("base:\n  dockerfile_inline: 'FROM scratch'\nchild:\n  inherits: [base]\n  dockerfile: Dockerfile\n"),
    )
    base, child = plan.entries
    assert (base.dockerfile, base.dockerfile_inline) == (None, "FROM scratch")
    assert (child.dockerfile, child.dockerfile_inline) == (tmp_path.resolve() / "Dockerfile", None)


def test_inherits_cycle_names_the_chain(tmp_path: Path) -> None:
    e = error(tmp_path, targets("a:\n  inherits: [b]\nb:\n  inherits: [c]\nc:\n  inherits: [a]\n"))
    assert str(e) == "build.yaml:8: targets.c.inherits[0]: inherits cycle: a -> b -> c -> a"


def test_inherits_unknown_target(tmp_path: Path) -> None:
    e = error(tmp_path, targets("base:\napp:\n  inherits: [bsae]\n"))
    assert str(e) == "build.yaml:5: targets.app.inherits[0]: unknown target 'bsae' (did you mean 'base'?)"


def test_groups_nest_and_dedupe(tmp_path: Path) -> None:
    text = targets("a:\nb:\nc:\n") + "groups:\n  all: [ab, c, a]\n  ab: [a, b]\n"
    plan = load(tmp_path, text, only=["all"])
    assert plan.groups == {"all": ["a", "b", "c"], "ab": ["a", "b"]}
    assert [e.id for e in plan.entries] == ["a", "b", "c"]


def test_group_cycle(tmp_path: Path) -> None:
    e = error(tmp_path, targets("a:\n") + "groups:\n  x: [a, y]\n  y: [x]\n")
    assert str(e) == "build.yaml:6: groups.y[0]: group cycle: x -> y -> x"


def test_group_unknown_member_and_name_clash(tmp_path: Path) -> None:
    e = error(tmp_path, targets("app:\n") + "groups:\n  g: [ap]\n")
    assert str(e) == "build.yaml:5: groups.g[0]: unknown target or group 'ap' (did you mean 'app'?)"
    e = error(tmp_path, targets("app:\n") + "groups:\n  app: [app]\n")
    assert str(e) == "build.yaml:5: groups.app: group 'app' has the same name as a target"


# --- --only -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("only", "ids"),
    [
        ((), ["app-3.11", "app-3.12", "docs"]),
        (("docs",), ["docs"]),
        (("app",), ["app-3.11", "app-3.12"]),
        (("app-3.12",), ["app-3.12"]),
        (("docs,app-3.11",), ["app-3.11", "docs"]),
        (("docs", " app-3.12 "), ["app-3.12", "docs"]),
        (("default",), ["app-3.11", "app-3.12", "docs"]),
    ],
)
def test_only(tmp_path: Path, only: tuple[str, ...], ids: list[str]) -> None:
    assert [e.id for e in load(tmp_path, EXAMPLE, only=only).entries] == ids


def test_only_without_default_group_takes_every_target(tmp_path: Path) -> None:
    text = EXAMPLE.replace("groups:\n  default: [app, docs]\n", "groups:\n  just: [docs]\n")
    assert [e.id for e in load(tmp_path, text).entries] == ["app-3.11", "app-3.12", "docs"]
    text = EXAMPLE.replace("default: [app, docs]", "default: [docs]")
    assert [e.id for e in load(tmp_path, text).entries] == ["docs"]


def test_only_unknown_lists_the_known_names(tmp_path: Path) -> None:
    e = error(tmp_path, EXAMPLE, only=["dcos"])
    assert (e.file, e.line, e.field) == ("--only", 0, "dcos")
    assert "targets: app, docs" in str(e)
    assert "groups: default" in str(e)
    assert "app-3.11" in str(e)


# --- --set --------------------------------------------------------------------------------------------------------


def test_set_forms(tmp_path: Path) -> None:
    sets = [
        "*.platforms=linux/amd64,linux/arm64",
        "app.args.EXTRA=1",
        "docs.labels.team=web",
        "docs.no-cache=1",
        "docs.pull=true",
        "app.push=false",
        "docs.tags=ghcr.io/acme/docs:x,ghcr.io/acme/docs:y",
        "docs.target=other",
    ]
    plan = load(tmp_path, EXAMPLE, sets=sets)
    app, _, docs = plan.entries
    assert app.platforms == docs.platforms == ["linux/amd64", "linux/arm64"]
    assert app.args == {"PYTHON_VERSION": "3.11", "EXTRA": "1"}
    assert docs.labels == {"team": "web"}
    assert (docs.no_cache, docs.pull, app.push, docs.stage) == (True, True, False, "other")
    assert docs.tags == ["ghcr.io/acme/docs:x", "ghcr.io/acme/docs:y"]
    assert docs.field_locations["tags"] == Location("--set", 0, "docs.tags=ghcr.io/acme/docs:x,ghcr.io/acme/docs:y")


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("app.platforms", "expected TARGET.FIELD=VALUE"),
        ("nope.push=true", "unknown target 'nope'"),
        ("app.tag=x:1", "unknown field 'tag' (did you mean 'tags'?)"),
        ("app.push=maybe", "push takes true, false, 1 or 0, not 'maybe'"),
        ("app.args=X", "args takes a key: app.args.KEY=VALUE"),
        ("app.tags.x=y", "tags takes no key"),
    ],
)
def test_bad_set(tmp_path: Path, item: str, problem: str) -> None:
    e = error(tmp_path, EXAMPLE, sets=[item])
    assert (e.file, e.field) == ("--set", item)
    assert str(e).startswith(f"--set: {item}: {problem}")


def test_set_value_that_breaks_a_tag_is_located_at_the_set(tmp_path: Path) -> None:
    e = error(tmp_path, EXAMPLE, sets=["docs.tags=Bad/Name:1"])
    assert (e.file, e.line, e.field) == ("--set", 0, "docs.tags=Bad/Name:1")
    assert "must be lowercase" in str(e)


def test_push_override(tmp_path: Path) -> None:
    plan = load(tmp_path, EXAMPLE, push=False)
    assert not any(e.push for e in plan.entries)
    plan = load(tmp_path, targets("a:\n  tags: [x:1]\n"), push=True)
    assert plan.entries[0].push is True


# --- errors, each with its exact location -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (targets("app:\n  tag: [x:1]\n"), "build.yaml:4: targets.app.tag: unknown field 'tag' (did you mean 'tags'?)"),
        ("version: 1\ntarget:\n  a: {}\n", "build.yaml:2: target: unknown field 'target' (did you mean 'targets'?)"),
        (targets("app:\n  tags: x:1\n"), "build.yaml:4: targets.app.tags: expected a list, got the string 'x:1'"),
        (targets("app:\n  tags: [x:1, [y]]\n"), "build.yaml:4: targets.app.tags[1]: expected a string, got a list"),
        (
            targets("app:\n  push: sometimes\n"),
            "build.yaml:4: targets.app.push: expected true or false, got the string 'sometimes'",
        ),
        (
            targets("app:\n  args:\n    A: 1\n    B: {x: 1}\n"),
            "build.yaml:6: targets.app.args.B: expected a string, got a mapping",
        ),
        (
            targets("app:\n  context: .\n  context: sub\n"),
            "build.yaml:5: targets.app.context: duplicate key 'context' (first written at line 4)",
        ),
        (
            targets("app:\n  tags: [x:1\n"),
            "build.yaml:5: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)",
        ),
        ("version: 2\ntargets: {a: {}}\n", "build.yaml:1: version: unsupported version 2 (this imgci reads version 1)"),
        ("version: 1\ntargets: {}\n", "build.yaml:2: targets: no targets defined"),
        ("version: 1\n", "build.yaml:1: targets: required field missing"),
        ("- a\n", "build.yaml:1: expected a mapping with version, defaults, targets and groups"),
        ("", "build.yaml:1: the file is empty (expected version: 1 and targets:)"),
        (
            "version: 1\ndefaults:\n  matrix: {a: [b]}\ntargets: {a: {}}\n",
            "build.yaml:3: defaults.matrix: unknown "
            "field 'matrix' (expected one of: context, dockerfile, dockerfile_inline, target, args, labels, tags, "
            "platforms, secrets, ssh, cache_from, cache_to, push, outputs, no_cache, pull)",
        ),
        (
            targets("app:\n  dockerfile: Dockerfile\n  dockerfile_inline: FROM x\n"),
            "build.yaml:3: targets.app: give either dockerfile or dockerfile_inline, not both",
        ),
        (
            targets("app:\n  tags:\n    - ghcr.io/acme/app:1\n    - ghcr.io/Acme/app:2\n"),
            "build.yaml:6: targets.app.tags[1]: invalid reference format: repository name 'Acme/app' must be lowercase",
        ),
        (
            targets("app:\n  tags: ['x:${{ matrix.pyhton }}']\n  matrix: {python: ['1']}\n"),
            "build.yaml:4: targets.app.tags[0]: unknown matrix variable 'pyhton' (did you mean 'python'?)",
        ),
        (
            targets("app:\n  args:\n    A: '${{ matrix.py }}'\n"),
            "build.yaml:5: targets.app.args.A: unknown matrix variable 'py': this target has no matrix",
        ),
        (
            targets("app:\n  args:\n    A: '${{ env.X }}'\n"),
            "build.yaml:5: targets.app.args.A: unsupported "
            "expression '${{ env.X }}': only ${{ matrix.NAME }} is substituted",
        ),
        (
            targets("app:\n  tags:\n    - 'x:{{ brnach }}'\n"),
            "build.yaml:5: targets.app.tags[0]: unknown template variable {{brnach}} (did you mean 'branch'?)",
        ),
        (
            targets("app:\n  labels:\n    a: '{{nope}}'\n"),
            "build.yaml:5: targets.app.labels.a: unknown template "
            "variable {{nope}} (expected one of: branch, tag, sha, short_sha, pr, version, major, minor, patch, "
            "default_branch, latest, ref_name, run_id, run_number, repo, event)",
        ),
        (
            targets("app:\n  context: nowhere\n"),
            "build.yaml:4: targets.app.context: build context 'nowhere' is not a directory",
        ),
        (
            targets("app:\n  dockerfile: Dockerfile.prod\n"),
            "build.yaml:4: targets.app.dockerfile: Dockerfile 'Dockerfile.prod' not found",
        ),
        (targets("app:\n  push: true\n"), "build.yaml:3: targets.app: push is true but there are no tags to push"),
        (
            targets("app:\n  matrix:\n    py: ['1']\n    exclude: [{py: '1'}]\n"),
            "build.yaml:4: targets.app.matrix: the matrix has no entries",
        ),
        (
            targets("app:\n  matrix:\n    python: ['1']\n    exclude: [{pyton: '1'}]\n"),
            "build.yaml:6: targets.app.matrix.exclude[0].pyton: 'pyton' is not a matrix key (did you mean 'python'?)",
        ),
        (
            targets("app:\n  platforms: [linux/amd64, 'a/b/c/d']\n"),
            "build.yaml:4: targets.app.platforms[1]: invalid platform 'a/b/c/d'",
        ),
        (
            targets("app:\n  cache_to: ['type=regsitry,ref=x']\n"),
            "build.yaml:4: targets.app.cache_to[0]: --cache-to: unknown type 'regsitry'",
        ),
        (targets("'bad name':\n"), "build.yaml:3: targets.bad name: invalid target name 'bad name'"),
    ],
)
def test_error_location(tmp_path: Path, text: str, message: str) -> None:
    e = error(tmp_path, text)
    assert str(e).startswith(message), str(e)
    assert e.file == "build.yaml"
    assert str(e).startswith(f"build.yaml:{e.line}: ")


def test_error_attributes(tmp_path: Path) -> None:
    e = error(tmp_path, targets("app:\n  tags:\n    - ok:1\n    - 'Bad:1'\n"))
    assert (e.file, e.line, e.field) == ("build.yaml", 6, "targets.app.tags[1]")
    assert isinstance(e, UsageError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_plan(Path("nope.yaml"), cwd=tmp_path, env=ENV)
    assert str(info.value) == "nope.yaml: no such file"


def test_yaml_syntax_error_line(tmp_path: Path) -> None:
    e = error(tmp_path, "version: 1\ntargets:\n  app:\n    tags: [a\n  b: : c\n")
    assert e.file == "build.yaml" and e.line > 0
    assert str(e).startswith(f"build.yaml:{e.line}: invalid YAML:")


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    text = targets("base: &base\n  args: {A: '1'}\n  tags: [x:1]\napp:\n  <<: *base\n  tags: [y:1]\n")
    plan = load(tmp_path, text)
    assert plan.entries[1].args == {"A": "1"}
    assert plan.entries[1].tags == ["docker.io/library/y:1"]


def test_push_error_says_every_tag_was_skipped(tmp_path: Path) -> None:
    e = error(tmp_path, targets("app:\n  push: true\n  tags: ['x:{{tag}}']\n"))
    assert "every tag was skipped" in str(e) and "not for a git tag" in str(e)
    assert e.hint is not None


# --- tags ---------------------------------------------------------------------------------------------------------


def test_tags_with_empty_values_are_dropped_with_notes(tmp_path: Path) -> None:
    text = targets("app:\n  tags: ['x:{{tag}}', 'x:pr-{{pr}}', 'x:{{latest}}', 'x:{{branch}}', 'x:{{ branch }}']\n")
    plan = load(tmp_path, text, env={**ENV, "IMGCI_CI_BRANCH": "dev"})
    (entry,) = plan.entries
    assert entry.tags == ["docker.io/library/x:dev"]
    assert len(entry.notes) == 3
    assert "{{tag}} is empty" in entry.notes[0]
    assert "'x:pr-{{pr}}'" in entry.notes[1]


def test_latest_on_the_default_branch(tmp_path: Path) -> None:
    plan = load(tmp_path, targets("app:\n  tags: ['ghcr.io/a/b:{{latest}}']\n"))
    assert plan.entries[0].tags == ["ghcr.io/a/b:latest"]


def test_tag_sanitising(tmp_path: Path) -> None:
    env = {**ENV, "IMGCI_CI_BRANCH": "feature/Foo#1"}
    plan = load(tmp_path, targets("app:\n  tags: ['ghcr.io/a/b:{{branch}}', 'ghcr.io/a/b:{{branch}}']\n"), env=env)
    assert plan.entries[0].tags == ["ghcr.io/a/b:feature-Foo-1"]
    env = {**ENV, "IMGCI_CI_BRANCH": "-." + "x" * 200}
    plan = load(tmp_path, targets("app:\n  tags: ['ghcr.io/a/b:{{branch}}']\n"), env=env)
    assert plan.entries[0].tags == ["ghcr.io/a/b:" + "x" * 128]


def test_repo_template_is_not_sanitised(tmp_path: Path) -> None:
    env = {**ENV, "IMGCI_CI_REPO": "acme/app"}
    plan = load(tmp_path, targets("app:\n  tags: ['ghcr.io/{{repo}}:{{short_sha}}']\n"), env=env)
    assert plan.entries[0].tags == ["ghcr.io/acme/app:0123456"]


def test_semver_tags(tmp_path: Path) -> None:
    env = {**ENV, "IMGCI_CI_BRANCH": "", "IMGCI_CI_TAG": "v1.2.3"}
    tags = "['r/a:{{version}}', 'r/a:{{major}}.{{minor}}', 'r/a:{{major}}', 'r/a:{{branch}}']"
    plan = load(tmp_path, targets(f"app:\n  tags: {tags}\n"), env=env)
    assert plan.entries[0].tags == ["docker.io/r/a:1.2.3", "docker.io/r/a:1.2", "docker.io/r/a:1"]


def test_non_tag_fields_take_empty_values(tmp_path: Path) -> None:
    plan = load(
        tmp_path,
        targets("app:\n  args: {PR: 'pr{{pr}}', B: '{{branch}}'}\n"),
        env={**ENV, "IMGCI_CI_BRANCH": "feature/x"},
    )
    assert plan.entries[0].args == {"PR": "pr", "B": "feature/x"}


# --- schema and documents -------------------------------------------------------------------------------------------


def test_json_schema() -> None:
    schema = json_schema()
    assert schema["title"] == "imgci build.yaml"
    assert "targets" in schema["properties"]
    assert schema["properties"]["targets"]["description"]
    json.dumps(schema)
    target = schema["$defs"]["Target"]
    assert target["additionalProperties"] is False
    assert target["properties"]["tags"]["description"]


def test_plan_document_json(tmp_path: Path) -> None:
    doc = json.loads(plan_document(load(tmp_path, EXAMPLE), "json", config_arg="build.yaml"))
    assert doc["config"] == "build.yaml"
    first = doc["entries"][0]
    assert set(first) == {"id", "target", "label", "matrix", "tags", "platforms", "push", "context", "dockerfile"}
    assert first["dockerfile"] == str(tmp_path.resolve() / "Dockerfile")


def test_plan_document_github_matrix(tmp_path: Path) -> None:
    text = plan_document(load(tmp_path, EXAMPLE), "github-matrix", config_arg="build.yaml")
    doc = json.loads(text)
    assert text == json.dumps(doc, separators=(",", ":"))  # compact: one line for $GITHUB_OUTPUT
    assert doc["include"][0] == {"id": "app-3.11", "target": "app", "label": "app (python=3.11)", "only": "app-3.11"}
    assert len(doc["include"]) == 3


def test_plan_document_gitlab(tmp_path: Path) -> None:
    doc = yaml.safe_load(plan_document(load(tmp_path, EXAMPLE), "gitlab", config_arg="ci/build.yaml"))
    assert list(doc) == ["imgci: app-3.11", "imgci: app-3.12", "imgci: docs"]
    job = doc["imgci: app-3.12"]
    assert job["image"] == {"name": "$IMGCI_IMAGE", "entrypoint": [""]}
    assert job["variables"] == {"IMGCI_ONLY": "app-3.12"}
    assert job["script"] == ["python -m imgci run ci/build.yaml --only app-3.12 $IMGCI_ARGS"]
    # the password reaches imgci login on stdin only, never a command line
    (login,) = job["before_script"]
    assert "--password-stdin" in login and "$CI_REGISTRY_PASSWORD" in login.split("|")[0]
    assert job["cache"] == {"key": "imgci-app-3.12-$CI_COMMIT_REF_SLUG", "paths": [".imgci-cache/"]}
    assert job["artifacts"] == {
        "reports": {"dotenv": "imgci.env"},
        "paths": ["imgci-metadata.json", "imgci-summary.md"],
        "when": "always",
    }


def test_plan_document_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown plan format"):
        plan_document(load(tmp_path, EXAMPLE), "circleci", config_arg="build.yaml")
