"""Stages, stage resolution, target pruning and ARG scoping must match BuildKit's dockerfile2llb."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from imgci.build.dockerfile import (
    ArgBinding,
    ArgInstruction,
    ArgScope,
    Dockerfile,
    EnvInstruction,
    RunInstruction,
    StageDependency,
    WorkdirInstruction,
    parse_dockerfile,
    parse_trigger,
    predefined_args,
    proxy_env,
    stage_dependencies,
    stages_needed,
)
from imgci.errors import DockerfileError
from imgci.oci import Platform

AMD64 = Platform("linux", "amd64")
ARM = predefined_args(Platform.parse("linux/arm/v7"), AMD64)


def needed(text: str, target: str | None = None, build_args: Mapping[str, str] | None = None) -> list[int]:
    return stages_needed(parse_dockerfile(text), target, build_args or {}, predefined=ARM)


# -- whole-file errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Dockerfile: the Dockerfile cannot be empty"),
        ("# just a comment\n\n", "Dockerfile: file with no instructions"),
        ("ARG A=1\n", "Dockerfile: dockerfile contains no stages to build (no FROM)"),
        ("ARG A\nRUN echo\nFROM a\n", "Dockerfile:2: no build stage in current context"),
        ("# escape=`\nEXPOSE 80\n", "Dockerfile:2: no build stage in current context"),
    ],
)
def test_file_level_errors(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as info:
        parse_dockerfile(text)
    assert str(info.value) == message


def test_filename_is_used_in_locations() -> None:
    with pytest.raises(DockerfileError) as info:
        parse_dockerfile("FROM a\nRUNN x\n", "ci/build.Dockerfile")
    assert str(info.value).startswith("ci/build.Dockerfile:2: unknown instruction: RUNN")
    assert parse_dockerfile("FROM a\nRUN x\n", "f").stages[0].instructions[0].location.file == "f"


# -- the Dockerfile object -------------------------------------------------------------------------------------------


def test_stages_and_global_args() -> None:
    df = parse_dockerfile("ARG A\nARG B=1 C\nFROM x AS Build\nARG A\nRUN a\nFROM build\nFROM y AS out\n")
    assert [a.original for a in df.global_args] == ["ARG A", "ARG B=1 C"]
    assert [(s.index, s.name, s.display_name) for s in df.stages] == [
        (0, "build", "build"),
        (1, None, "stage-1"),
        (2, "out", "out"),
    ]
    assert [type(i) for i in df.stages[0].instructions] == [ArgInstruction, RunInstruction]
    assert df.stage("BUILD") is df.stages[0]
    assert df.stage(2) is df.stages[2] and df.stage("1") is df.stages[1]
    assert df.stage("nope") is None and df.stage(3) is None and df.stage(-1) is None
    assert df.stage_names() == ["build", "out"]


def test_duplicate_stage_names_resolve_to_the_last_one() -> None:
    df = parse_dockerfile("FROM a AS x\nFROM b AS x\nFROM c\nCOPY --from=x / /\n")
    assert df.stage("x") is df.stages[1]


# -- dependencies ----------------------------------------------------------------------------------------------------


def deps(text: str, index: int, env: Mapping[str, str] | None = None) -> list[StageDependency]:
    df = parse_dockerfile(text)
    return stage_dependencies(df, df.stages[index], env or {})


def test_from_refers_only_to_earlier_stages_by_exact_name() -> None:
    text = "FROM base AS a\nFROM a AS b\nFROM c AS c\nFROM d\nFROM A\nFROM scratch\nFROM ${S}\n"
    assert deps(text, 0) == [StageDependency("image", "base")]
    assert deps(text, 1) == [StageDependency("stage", 0)]
    assert deps(text, 2) == [StageDependency("image", "c")]  # itself: an image
    assert deps(text, 4) == [StageDependency("image", "A")]  # names are lower-cased, the lookup is exact
    assert deps(text, 5) == [StageDependency("scratch", "scratch")]
    assert deps(text, 6, {"S": "b"}) == [StageDependency("stage", 1)]  # after global-ARG expansion
    later = "FROM later AS first\nFROM x AS later\n"
    assert deps(later, 0) == [StageDependency("image", "later")]  # a later stage: an image


def test_copy_from_and_run_mount_from() -> None:
    text = (
        "FROM a AS Build\nFROM b\n"
        "COPY --from=BUILD /a /a\nCOPY --from=0 /b /b\nCOPY --from=alpine:3 /c /c\nCOPY --from=scratch /d /d\n"
        "RUN --mount=from=build,target=/m --mount=type=cache,target=/c --mount=from=0,target=/i x\n"
        "COPY x y\n"
    )
    assert deps(text, 1) == [
        StageDependency("image", "b"),
        StageDependency("stage", 0),
        StageDependency("stage", 0),
        StageDependency("image", "alpine:3"),
        StageDependency("scratch", "scratch"),
        StageDependency("stage", 0),
        StageDependency("image", "0"),  # RUN --mount from= does not take an index
    ]


@pytest.mark.parametrize("source", ["$X", "${X}", "${X:-a}"])
def test_variables_in_copy_from_are_rejected(source: str) -> None:
    with pytest.raises(DockerfileError) as info:
        needed(f"FROM a AS x\nFROM b\nCOPY --from={source} / /\n")
    assert str(info.value).startswith("Dockerfile:3: variable expansion is not supported for --from")


def test_copy_from_index_out_of_range() -> None:
    with pytest.raises(DockerfileError) as info:
        needed("FROM a\nFROM b\nRUN x\nCOPY --from=2 / /\n")
    assert str(info.value) == "Dockerfile:4: invalid stage index 2 (the Dockerfile has 2 stages)"
    with pytest.raises(DockerfileError, match=r"^Dockerfile:3: invalid stage index -1"):
        needed("FROM a\nFROM b\nCOPY --from=-1 / /\n")


# -- target pruning and ordering -------------------------------------------------------------------------------------

MULTI = """\
ARG BASE=builder
FROM golang AS builder
RUN build
FROM alpine AS tools
FROM ${BASE} AS mid
COPY --from=tools /t /t
FROM node AS unrelated
FROM scratch AS final
COPY --from=mid /app /app
RUN --mount=from=unrelated,target=/u true
"""


def test_default_target_is_the_last_stage_and_needs_its_closure() -> None:
    assert needed(MULTI) == [0, 1, 2, 3, 4]
    assert needed(MULTI, "mid") == [0, 1, 2]
    assert needed(MULTI, "TOOLS") == [1]
    assert needed(MULTI, "unrelated") == [3]


def test_build_args_change_what_from_refers_to() -> None:
    assert needed(MULTI, "mid", {"BASE": "debian"}) == [1, 2]
    assert needed(MULTI, "mid", {"BASE": "tools"}) == [1, 2]


def test_platform_args_select_stages() -> None:
    text = "FROM a AS build-amd64\nFROM b AS build-arm\nFROM build-$TARGETARCH\n"
    assert needed(text) == [1, 2]
    assert stages_needed(parse_dockerfile(text), predefined=predefined_args(AMD64, AMD64)) == [0, 2]


def test_unknown_target_lists_the_stages() -> None:
    with pytest.raises(DockerfileError) as info:
        needed(MULTI, "buider")
    assert str(info.value) == (
        'Dockerfile: target stage "buider" could not be found (did you mean builder?); '
        "stages: builder, tools, mid, unrelated, final"
    )
    with pytest.raises(DockerfileError, match="stage-0"):
        needed("FROM a\nFROM b AS b\n", "stage-0")


def test_cycles_are_detected_with_the_stages_and_line() -> None:
    with pytest.raises(DockerfileError) as info:
        needed("FROM a AS self\nCOPY --from=self / /\n")
    assert str(info.value) == "Dockerfile:2: circular dependency detected on stage: self (self -> self)"
    text = "FROM x AS a\nRUN one\nCOPY --from=b / /\nFROM y AS b\nRUN --mount=from=a,target=/m true\nFROM z\n"
    with pytest.raises(DockerfileError) as info:
        needed(text, "b")
    assert str(info.value) == "Dockerfile:3: circular dependency detected on stage: a (a -> b -> a)"


def test_cycles_in_unreachable_stages_still_fail_like_buildkit() -> None:
    with pytest.raises(DockerfileError, match="circular dependency detected on stage: loop"):
        needed("FROM a AS loop\nCOPY --from=1 / /\nFROM b\nCOPY --from=loop / /\nFROM c AS target\n", "target")


def test_copying_from_a_later_stage_is_an_error_when_needed() -> None:
    text = "FROM a AS first\nCOPY --from=second / /\nFROM b AS second\nRUN x\n"
    with pytest.raises(DockerfileError) as info:
        needed(text, "first")
    assert str(info.value) == (
        'Dockerfile:2: cannot copy from stage "second", it needs to be defined before current stage "first"'
    )
    assert needed(text, "second") == [1]


def test_from_expansion_errors_are_reported_for_every_stage() -> None:
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: base name \(\$\{NOPE\}\) should not be blank"):
        needed("FROM a AS ok\nFROM ${NOPE}\nFROM b\n", "ok")


# -- ARG scope -------------------------------------------------------------------------------------------------------


def test_predefined_args() -> None:
    assert predefined_args(Platform.parse("linux/arm64/v8"), Platform.parse("linux/arm/v6")) == {
        "BUILDPLATFORM": "linux/arm/v6",
        "BUILDOS": "linux",
        "BUILDARCH": "arm",
        "BUILDVARIANT": "v6",
        "TARGETPLATFORM": "linux/arm64",
        "TARGETOS": "linux",
        "TARGETARCH": "arm64",
        "TARGETVARIANT": "",
    }


def test_global_scope() -> None:
    df = parse_dockerfile("ARG A=1\nARG B=${A}2 TARGETOS\nARG C\nARG TARGETARCH=x\nARG D=$TARGETVARIANT\nFROM a\n")
    scope = ArgScope(df, {"C": "c", "BUILDARCH": "ppc64le", "UNDECLARED": "u"}, ARM)
    values = scope.global_values
    assert (values["A"], values["B"], values["C"], values["D"]) == ("1", "12", "c", "v7")
    assert values["TARGETOS"] == "linux" and values["TARGETARCH"] == "x" and values["BUILDARCH"] == "ppc64le"
    assert "UNDECLARED" not in values
    assert ArgScope(df, {"A": "9"}, ARM).global_values["B"] == "92"


def test_global_arg_default_errors_carry_the_line() -> None:
    df = parse_dockerfile('ARG A\nARG B="${A:?A is required}"\nFROM a\n')
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: .*A: A is required"):
        ArgScope(df, {}, ARM)
    assert ArgScope(df, {"A": "1"}, ARM).global_values["B"] == "1"
    unquoted = parse_dockerfile("ARG B=${A:?A is required}\nFROM a\n")  # ARG words split on spaces, as BuildKit
    assert [d.name for d in unquoted.global_args[0].args] == ["B", "is", "required}"]


def test_stage_arg_declarations() -> None:
    df = parse_dockerfile(
        "ARG VERSION=1.0 GLOBAL_ONLY=g\nFROM a\nARG VERSION TARGETARCH NOVALUE FROM_CLI\n"
        "ARG X=$VERSION-$NOVALUE Y=${X}y OVERRIDDEN=default\n"
    )
    scope = ArgScope(df, {"FROM_CLI": "cli", "OVERRIDDEN": "o"}, ARM)
    first, second = df.stages[0].instructions
    assert isinstance(first, ArgInstruction) and isinstance(second, ArgInstruction)
    assert scope.declare(first, {}) == [
        ArgBinding("VERSION", "1.0"),  # inherited from the global ARG
        ArgBinding("TARGETARCH", "arm"),  # predefined, now declared
        ArgBinding("NOVALUE", None),
        ArgBinding("FROM_CLI", "cli"),
    ]
    env = {"VERSION": "1.0"}
    assert scope.declare(second, env) == [
        ArgBinding("X", "1.0-"),
        ArgBinding("Y", "1.0-y"),  # sees X from the same line
        ArgBinding("OVERRIDDEN", "o"),  # a build arg beats the default
    ]


def test_dispatcher_walkthrough_env_and_arg_share_one_map() -> None:
    """The loop the dispatcher runs (see stages.py): ARG bindings and ENV both set the expansion env, in order."""
    df = parse_dockerfile(
        "FROM a\nARG NAME=arg\nWORKDIR /$NAME\nENV NAME=env\nWORKDIR /$NAME\nARG NAME\nWORKDIR /$NAME\n"
        "ARG LATE=late\nENV OTHER=$LATE\n"
    )
    scope = ArgScope(df, {"NAME": "cli"}, ARM)
    env: dict[str, str] = {"PATH": "/usr/bin"}
    config_env: dict[str, str] = dict(env)
    workdirs = []
    for instruction in df.stages[0].instructions:
        if isinstance(instruction, ArgInstruction):
            for binding in scope.declare(instruction, env):
                if binding.value is not None:
                    env[binding.name] = binding.value
            continue
        expanded = instruction.expand(env)
        if isinstance(expanded, EnvInstruction):
            env.update(expanded.pairs)
            config_env.update(expanded.pairs)
        if isinstance(expanded, WorkdirInstruction):
            workdirs.append(expanded.path)
    assert workdirs == ["/cli", "/env", "/cli"]
    assert config_env == {"PATH": "/usr/bin", "NAME": "env", "OTHER": "late"}


def test_proxy_env() -> None:
    args = {"HTTP_PROXY": "http://a", "https_proxy": "http://b", "No_Proxy": "x", "OTHER": "y"}
    assert proxy_env(args) == {
        "HTTP_PROXY": "http://a",
        "http_proxy": "http://a",
        "HTTPS_PROXY": "http://b",
        "https_proxy": "http://b",
        "NO_PROXY": "x",
        "no_proxy": "x",
    }


def test_dockerfile_is_a_plain_value() -> None:
    df = parse_dockerfile("FROM a\n")
    assert isinstance(df, Dockerfile) and df.filename == "Dockerfile" and df.notes == [] and df.directives == {}


def test_onbuild_triggers_from_a_base_image() -> None:
    from_ = parse_dockerfile("ARG X\n\nFROM base\n").stages[0].from_
    run = parse_trigger("RUN <<EOF\necho $X\nEOF", from_)
    assert isinstance(run, RunInstruction)
    assert run.location.start == 3 and run.heredocs[0].content == "echo $X\n"
    with pytest.raises(DockerfileError, match=r"^Dockerfile:3: onbuild trigger should be a single expression"):
        parse_trigger("RUN a\nRUN b", from_)
    with pytest.raises(DockerfileError, match=r"^Dockerfile:3: FROM isn't allowed as an ONBUILD trigger"):
        parse_trigger("FROM x", from_)
    with pytest.raises(DockerfileError, match=r"^Dockerfile:3: unknown instruction: RUNN"):
        parse_trigger("RUNN x", from_)
