"""Every instruction's parsing, flags, errors and expansion must match BuildKit (frontend/dockerfile/instructions
and the expansion done in dockerfile2llb)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from imgci.build.dockerfile import (
    AddInstruction,
    ArgDefinition,
    ArgInstruction,
    CmdInstruction,
    CopyInstruction,
    EntrypointInstruction,
    EnvInstruction,
    ExposeInstruction,
    HealthcheckInstruction,
    InlineSource,
    Instruction,
    LabelInstruction,
    Location,
    MaintainerInstruction,
    OnbuildInstruction,
    RunInstruction,
    RunScript,
    ShellInstruction,
    StopsignalInstruction,
    UserInstruction,
    VolumeInstruction,
    WorkdirInstruction,
    parse_dockerfile,
)
from imgci.build.dockerfile.flags import parse_go_duration
from imgci.errors import DockerfileError


def one(line: str, *, prefix: str = "") -> Instruction:
    """The single instruction ``line`` parsed inside a stage (on line 2, or later after ``prefix``)."""
    df = parse_dockerfile(prefix + "FROM base\n" + line + "\n")
    (instruction,) = df.stages[0].instructions
    return instruction


def error(line: str) -> str:
    with pytest.raises(DockerfileError) as info:
        parse_dockerfile("FROM base\n" + line + "\n")
    return str(info.value)


@pytest.mark.parametrize(
    ("line", "value", "expanded"),
    [
        ("ENV A=$X", lambda i: i.pairs[0][1], True),
        ("LABEL A=$X", lambda i: i.pairs[0][1], True),
        ("EXPOSE $X", lambda i: i.ports[0], True),
        ("VOLUME $X", lambda i: i.volumes[0], True),
        ("USER $X", lambda i: i.user, True),
        ("WORKDIR $X", lambda i: i.path, True),
        ("STOPSIGNAL $X", lambda i: i.signal, True),
        ("COPY $X $X", lambda i: i.sources[0] + i.dest, True),
        ("ADD $X $X", lambda i: i.sources[0] + i.dest, True),
        ("COPY --chown=$X --chmod=$X a b", lambda i: i.chown + i.chmod, True),
        ("ADD --chown=$X --checksum=$X a b", lambda i: i.chown + i.checksum, True),
        ("RUN --mount=target=$X true", lambda i: i.mount_options[0]["target"], True),
        ("ARG A=$X", lambda i: i.args[0].default, False),
        ("MAINTAINER $X", lambda i: i.maintainer, False),
        ('SHELL ["$X"]', lambda i: i.shell[0], False),
        ("CMD $X", lambda i: i.args[0], False),
        ("ENTRYPOINT $X", lambda i: i.args[0], False),
        ("HEALTHCHECK CMD $X", lambda i: i.test[1], False),
        ("RUN $X", lambda i: i.args[0], False),
        ("ONBUILD RUN $X", lambda i: i.expression, False),
        ("COPY --from=$X a b", lambda i: i.from_, False),
        ("COPY --exclude=$X a b", lambda i: i.excludes[0], False),
    ],
)
def test_which_parts_are_expanded(line: str, value: Callable[[Any], str], expanded: bool) -> None:
    instruction = one(line).expand({"X": "9"})
    text = value(instruction)
    assert ("$X" not in text and "9" in text) if expanded else "$X" in text


def test_run_heredocs_are_not_expanded() -> None:
    run = one("RUN <<EOF\necho $X\nEOF")
    assert isinstance(run, RunInstruction)
    assert run.expand({"X": "1"}).heredocs[0].content == "echo $X\n"


def test_expansion_uses_the_escape_directive() -> None:
    env = one('ENV A=`$B B=\\$B C="`""', prefix="# escape=`\n").expand({"B": "b"})
    assert isinstance(env, EnvInstruction)
    assert env.pairs == (("A", "$B"), ("B", "\\b"), ("C", '"'))


def test_common_fields() -> None:
    run = one("run   echo hi  ")
    assert run.keyword == "RUN" and run.original == "run   echo hi" and run.escape == "\\"
    assert run.location == Location("Dockerfile", 2, 2) and run.line == 2


# -- FROM ------------------------------------------------------------------------------------------------------------


def test_from_forms() -> None:
    df = parse_dockerfile("FROM alpine\nFROM --platform=linux/arm64 a/b:1 As Build.er-1_x\nFROM --platform= c\n")
    assert [(s.from_.image, s.from_.name, s.from_.platform) for s in df.stages] == [
        ("alpine", None, None),
        ("a/b:1", "build.er-1_x", "linux/arm64"),
        ("c", None, None),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("FROM", "FROM requires either one or three arguments"),
        ("FROM a b", "FROM requires either one or three arguments"),
        ("FROM a AS b c", "FROM requires either one or three arguments"),
        ("FROM a AS 1st", 'invalid name for build stage: "1st", name can\'t start with a number'),
        ("FROM a AS b$c", 'invalid name for build stage: "b$c"'),
        ("FROM --plat=x a", "unknown flag: --plat (did you mean --platform?)"),
        ("FROM --platform a", "Missing a value on flag: platform"),
    ],
)
def test_from_errors(line: str, message: str) -> None:
    with pytest.raises(DockerfileError) as info:
        parse_dockerfile("FROM ok\n" + line + "\n")
    assert str(info.value).startswith("Dockerfile:2: ")
    assert message in str(info.value)


def test_from_expansion() -> None:
    from_ = parse_dockerfile("FROM --platform=$P ${IMG:-busybox}:$TAG AS x\n").stages[0].from_
    expanded = from_.expand({"P": "linux/arm64/v8", "TAG": "1.36"})
    assert (expanded.image, expanded.platform, expanded.name) == ("busybox:1.36", "linux/arm64/v8", "x")
    with pytest.raises(DockerfileError, match=r"^Dockerfile:1: base name \(\$NOPE\) should not be blank"):
        parse_dockerfile("FROM $NOPE\n").stages[0].from_.expand({})
    with pytest.raises(DockerfileError, match="empty platform value from expression"):
        from_.expand({"TAG": "1"})
    with pytest.raises(DockerfileError, match="failed to parse platform"):
        from_.expand({"P": "not/a/valid/platform"})


# -- ARG, ENV, LABEL -------------------------------------------------------------------------------------------------


def test_arg_forms() -> None:
    arg = one('ARG A B=1 C= D="x y" E=$F')
    assert isinstance(arg, ArgInstruction)
    assert arg.args == (
        ArgDefinition("A", None),
        ArgDefinition("B", "1"),
        ArgDefinition("C", ""),
        ArgDefinition("D", '"x y"'),
        ArgDefinition("E", "$F"),
    )
    assert arg.expand({"F": "f"}) is arg  # ARG values are evaluated by ArgScope, not expand
    assert "ARG requires at least one argument" in error("ARG")
    assert error("ARG =x") == "Dockerfile:2: ARG names can not be blank"
    assert isinstance(one("ARG --whatever A"), ArgInstruction)  # BuildKit never parses ARG's flags


@pytest.mark.parametrize("keyword", ["ENV", "LABEL"])
def test_env_and_label_forms(keyword: str) -> None:
    instruction = one(f'{keyword} A=1 B="two words" C=x\\ y D= "E F"=g')
    assert isinstance(instruction, (EnvInstruction, LabelInstruction))
    assert instruction.pairs == (("A", "1"), ("B", '"two words"'), ("C", "x\\ y"), ("D", ""), ('"E F"', "g"))
    assert not instruction.legacy
    expanded = instruction.expand({})
    assert expanded.pairs == (("A", "1"), ("B", "two words"), ("C", "x y"), ("D", ""), ("E F", "g"))
    legacy = one(f"{keyword} NAME  the rest   of the line")
    assert isinstance(legacy, (EnvInstruction, LabelInstruction))
    assert legacy.pairs == (("NAME", "the rest   of the line"),) and legacy.legacy
    assert f"{keyword} must have two arguments" in error(f"{keyword} ALONE")
    assert f"{keyword} requires at least one argument" in error(keyword)
    assert 'Syntax error - can\'t find = in "b". Must be of the form: name=value' in error(f"{keyword} a=1 b")
    assert f"{keyword} names can not be blank" in error(f"{keyword} =1")
    assert "unknown flag: --x" in error(f"{keyword} --x=1 A=1")


def test_env_expansion_uses_values_from_before_the_instruction() -> None:
    env = one("ENV A=2 B=$A C=${A}x $A=key").expand({"A": "1"})
    assert isinstance(env, EnvInstruction)
    assert env.pairs == (("A", "2"), ("B", "1"), ("C", "1x"), ("1", "key"))


# -- EXPOSE, VOLUME, USER, WORKDIR, STOPSIGNAL, MAINTAINER, SHELL ----------------------------------------------------


def test_expose() -> None:
    expose = one("EXPOSE 8080 $PORTS 53/UDP")
    assert isinstance(expose, ExposeInstruction)
    assert expose.ports == ("$PORTS", "53/UDP", "8080")  # sorted at parse time, as BuildKit does
    expanded = expose.expand({"PORTS": "80 443/tcp 7000-7001"})
    assert expanded.ports == ("80", "443/tcp", "7000-7001", "53/UDP", "8080")
    assert expanded.port_specs() == ["80/tcp", "443/tcp", "7000/tcp", "7001/tcp", "53/udp", "8080/tcp"]
    with pytest.raises(DockerfileError, match=r"^Dockerfile:2: invalid proto: xyz"):
        one("EXPOSE 80/xyz").expand({})
    with pytest.raises(DockerfileError, match="invalid containerPort: 99999"):
        one("EXPOSE 99999").expand({})
    assert "EXPOSE requires at least one argument" in error("EXPOSE")


def test_volume() -> None:
    volume = one("VOLUME /a $B")
    assert isinstance(volume, VolumeInstruction) and volume.volumes == ("/a", "$B") and not volume.json
    assert volume.expand({"B": "/b c"}).volumes == ("/a", "/b c")  # one word per volume, never split
    json = one('VOLUME ["/a b", "/c"]')
    assert isinstance(json, VolumeInstruction) and json.volumes == ("/a b", "/c") and json.json
    assert "VOLUME specified can not be an empty string" in error('VOLUME ["/a", " "]')
    with pytest.raises(DockerfileError, match="VOLUME specified can not be an empty string"):
        volume.expand({})


@pytest.mark.parametrize(
    ("line", "cls", "attribute", "expanded"),
    [
        ("USER $U:${G:-0}", UserInstruction, "user", "app:0"),
        ('WORKDIR "$HOME/my dir"', WorkdirInstruction, "path", "/home/app/my dir"),
        ("STOPSIGNAL SIG$SIG", StopsignalInstruction, "signal", "SIGTERM"),
    ],
)
def test_single_value_instructions_expand(line: str, cls: type, attribute: str, expanded: str) -> None:
    instruction = one(line)
    assert isinstance(instruction, cls)
    env = {"U": "app", "HOME": "/home/app", "SIG": "TERM"}
    assert getattr(instruction.expand(env), attribute) == expanded


@pytest.mark.parametrize("keyword", ["USER", "WORKDIR", "STOPSIGNAL", "MAINTAINER"])
def test_single_value_instructions_need_an_argument(keyword: str) -> None:
    assert error(keyword) == f"Dockerfile:2: {keyword} requires exactly one argument"


@pytest.mark.parametrize("signal", ["9", "KILL", "sigusr1", "SIGRTMIN+3", "RTMAX"])
def test_stopsignal_values(signal: str) -> None:
    one(f"STOPSIGNAL {signal}").expand({})


@pytest.mark.parametrize("signal", ["0", "SIGNOPE", "TERM2"])
def test_bad_stopsignal(signal: str) -> None:
    with pytest.raises(DockerfileError, match=f"invalid signal: {signal}"):
        one(f"STOPSIGNAL {signal}").expand({})


def test_stopsignal_flags_are_ignored_like_buildkit() -> None:
    assert isinstance(one("STOPSIGNAL --x=1 TERM"), StopsignalInstruction)


def test_maintainer_is_kept_with_a_note() -> None:
    df = parse_dockerfile("FROM a\nMAINTAINER Jane <jane@example.com>\n")
    maintainer = df.stages[0].instructions[0]
    assert isinstance(maintainer, MaintainerInstruction) and maintainer.maintainer == "Jane <jane@example.com>"
    assert maintainer.expand({"X": "1"}) is maintainer
    assert any("MAINTAINER is deprecated" in note for note in df.notes)


def test_shell() -> None:
    shell = one('SHELL ["powershell", "-command"]')
    assert isinstance(shell, ShellInstruction) and shell.shell == ("powershell", "-command")
    assert error("SHELL /bin/bash -c") == "Dockerfile:2: SHELL requires the arguments to be in JSON form"
    assert "SHELL requires the arguments to be in JSON form" in error('SHELL ["/bin/bash", "-c"')  # bad JSON
    assert error("SHELL []") == "Dockerfile:2: SHELL requires at least one argument"


# -- CMD, ENTRYPOINT, HEALTHCHECK ------------------------------------------------------------------------------------


def test_cmd_and_entrypoint_forms_are_never_expanded() -> None:
    cmd = one("CMD echo $HOME")
    assert isinstance(cmd, CmdInstruction) and cmd.args == ("echo $HOME",) and cmd.prepend_shell
    assert cmd.expand({"HOME": "/x"}) is cmd
    exec_form = one('CMD ["echo", "$HOME"]')
    assert isinstance(exec_form, CmdInstruction) and exec_form.args == ("echo", "$HOME")
    assert not exec_form.prepend_shell
    empty = one("CMD []")
    assert isinstance(empty, CmdInstruction) and empty.args == () and not empty.prepend_shell
    entrypoint = one("ENTRYPOINT []")
    assert isinstance(entrypoint, EntrypointInstruction) and entrypoint.args is None
    bare = one("ENTRYPOINT")
    assert isinstance(bare, EntrypointInstruction) and bare.args is None and bare.prepend_shell
    shell_form = one("ENTRYPOINT exec top -b")
    assert isinstance(shell_form, EntrypointInstruction) and shell_form.args == ("exec top -b",)


def test_cmd_shell_form_starting_with_a_flag_is_an_unknown_flag() -> None:
    # BuildKit extracts --words after every keyword, so this is its error too.
    assert error("CMD --help") == "Dockerfile:2: unknown flag: --help"


def test_healthcheck() -> None:
    check = one(
        "HEALTHCHECK --interval=1m30s --timeout=1.5s --start-period=2h --start-interval=500ms --retries=5 "
        "CMD curl -f http://x/ || exit 1"
    )
    assert isinstance(check, HealthcheckInstruction)
    assert check.test == ("CMD-SHELL", "curl -f http://x/ || exit 1")
    assert (check.interval, check.timeout, check.start_period, check.start_interval, check.retries) == (
        90_000_000_000,
        1_500_000_000,
        7_200_000_000_000,
        500_000_000,
        5,
    )
    exec_form = one('HEALTHCHECK cmd ["/bin/check", "$X"]')
    assert isinstance(exec_form, HealthcheckInstruction) and exec_form.test == ("CMD", "/bin/check", "$X")
    assert (exec_form.interval, exec_form.retries) == (0, 0)
    none = one("HEALTHCHECK none")
    assert isinstance(none, HealthcheckInstruction) and none.test == ("NONE",)
    assert isinstance(one("HEALTHCHECK --bogus NONE"), HealthcheckInstruction)  # NONE never parses flags
    assert isinstance(one("HEALTHCHECK --interval=0 CMD x"), HealthcheckInstruction)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        ("HEALTHCHECK RUN x", 'Unknown type "RUN" in HEALTHCHECK (try CMD)'),
        ("HEALTHCHECK --interval=10 CMD x", 'time: missing unit in duration "10"'),
        ("HEALTHCHECK --interval=1y CMD x", 'time: unknown unit "y" in duration "1y"'),
        ("HEALTHCHECK --timeout=500us CMD x", 'Interval "timeout" cannot be less than 1ms'),
        ("HEALTHCHECK --retries=-1 CMD x", "--retries cannot be negative (-1)"),
        ("HEALTHCHECK --retries=x CMD x", 'strconv.ParseInt: parsing "x": invalid syntax'),
        ("HEALTHCHECK --start-periods=1s CMD x", "unknown flag: --start-periods (did you mean --start-period?)"),
    ],
)
def test_healthcheck_errors(line: str, message: str) -> None:
    assert error(line) == f"Dockerfile:2: {message}"


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("0", 0),
        ("1ns", 1),
        ("1.5h", 5_400_000_000_000),
        ("2h45m0.5s", 9_900_500_000_000),
        ("-1.5s", -1_500_000_000),
        ("+10ms", 10_000_000),
        ("1µs", 1_000),
        (".5s", 500_000_000),
        ("1.s", 1_000_000_000),
    ],
)
def test_go_durations(text: str, nanoseconds: int) -> None:
    assert parse_go_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["", "1", "s", ".s", "1..2s", "-", "1d", "1 s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_go_duration(text)


# -- ONBUILD ---------------------------------------------------------------------------------------------------------


def test_onbuild_wraps_a_parsed_trigger() -> None:
    onbuild = one("ONBUILD  copy --chown=$U . /app")
    assert isinstance(onbuild, OnbuildInstruction)
    assert onbuild.expression == "copy --chown=$U . /app"
    assert isinstance(onbuild.trigger, CopyInstruction) and onbuild.trigger.chown == "$U"
    assert onbuild.expand({"U": "x"}) is onbuild  # expanded when the trigger runs downstream


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ONBUILD", "ONBUILD requires at least one argument"),
        ("ONBUILD ONBUILD RUN x", "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"),
        ("ONBUILD from x", "FROM isn't allowed as an ONBUILD trigger"),
        ("ONBUILD MAINTAINER me", "MAINTAINER isn't allowed as an ONBUILD trigger"),
        ("ONBUILD RUNN x", "unknown instruction: RUNN (did you mean RUN?)"),
        ("ONBUILD --x RUN y", "unknown flag: --x"),
    ],
)
def test_onbuild_errors(line: str, message: str) -> None:
    assert error(line) == f"Dockerfile:2: {message}"


# -- COPY and ADD ----------------------------------------------------------------------------------------------------


def test_copy_flags() -> None:
    copy = one("COPY --from=Build --chown=u:g --chmod=0755 --link --parents --exclude=*.md --exclude=x/ a b /d/")
    assert isinstance(copy, CopyInstruction)
    assert (copy.from_, copy.chown, copy.chmod, copy.link, copy.parents) == ("Build", "u:g", "0755", True, True)
    assert copy.excludes == ("*.md", "x/") and copy.sources == ("a", "b") and copy.dest == "/d/"
    plain = one("COPY a b")
    assert isinstance(plain, CopyInstruction)
    assert (plain.from_, plain.chown, plain.chmod, plain.link, plain.parents, plain.excludes) == (
        None,
        None,
        None,
        False,
        False,
        (),
    )
    assert isinstance(one("COPY --link=false a b"), CopyInstruction)


def test_add_flags() -> None:
    add = one(
        "ADD --chown=1 --chmod=600 --link --keep-git-dir --checksum=sha256:abc --unpack=false --exclude=*.tmp "
        "https://example.com/x.tar.gz /x/"
    )
    assert isinstance(add, AddInstruction)
    assert (add.chown, add.chmod, add.link, add.keep_git_dir, add.checksum, add.unpack) == (
        "1",
        "600",
        True,
        True,
        "sha256:abc",
        False,
    )
    assert add.excludes == ("*.tmp",) and add.sources == ("https://example.com/x.tar.gz",)
    plain = one("ADD a b")
    assert isinstance(plain, AddInstruction) and (plain.keep_git_dir, plain.unpack, plain.checksum) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("COPY a", "COPY requires at least two arguments, but only one was provided. Destination could not be"),
        ("ADD", "ADD requires at least two arguments"),
        ("COPY --frm=x a b", "unknown flag: --frm (did you mean --from?)"),
        ("ADD --from=x a b", "unknown flag: --from"),
        ("COPY --checksum=x a b", "unknown flag: --checksum"),
        ("ADD --parents a b", "unknown flag: --parents"),
        ("COPY --from a b", "Missing a value on flag: from"),
        ("COPY --link=yes a b", "Expecting boolean value for flag link, not: yes"),
        ("COPY --link= a b", "Missing a value on flag: link"),
        ("COPY --from=a --from=b a b", "Duplicate flag specified: from"),
        ("COPY --exclude a b", "Missing a value on flag: exclude"),
    ],
)
def test_copy_and_add_errors(line: str, message: str) -> None:
    text = error(line)
    assert text.startswith("Dockerfile:2: ") and message in text


def test_copy_expansion() -> None:
    copy = one('COPY --from=b --chown=$U:$G --chmod=$M --exclude=$E $SRC "$D/"')
    assert isinstance(copy, CopyInstruction)
    expanded = copy.expand({"U": "1", "G": "2", "M": "644", "SRC": "a b", "D": "/dst dir", "E": "x"})
    assert expanded.sources == ("a b",)  # one word even when the value has spaces
    assert (expanded.dest, expanded.chown, expanded.chmod) == ("/dst dir/", "1:2", "644")
    assert expanded.from_ == "b" and expanded.excludes == ("$E",)  # neither is expanded by BuildKit
    assert copy.expand({}).chown == ":"
    with pytest.raises(DockerfileError, match=r'^Dockerfile:2: failed to process "\\"a": unexpected end'):
        one('COPY "a b" /d').expand({})


def test_add_checksum_is_expanded() -> None:
    add = one("ADD --checksum=$SUM https://x/y /y")
    assert isinstance(add, AddInstruction) and add.expand({"SUM": "sha256:1"}).checksum == "sha256:1"


def test_copy_heredoc_expansion() -> None:
    text = 'FROM a\nCOPY <<EOF <<"RAW" /x/\nvalue=$V "${W:-w}" it\'s \\$V\nEOF\nraw=$V\nRAW\n'
    copy = parse_dockerfile(text).stages[0].instructions[0]
    assert isinstance(copy, CopyInstruction)
    expanded = copy.expand({"V": "1"})
    assert expanded.contents == (
        InlineSource("EOF", 'value=1 "w" it\'s $V\n', True),  # quotes are literal in a heredoc body
        InlineSource("RAW", "raw=$V\n", False),
    )


def test_copy_heredoc_expansion_ignores_the_escape_directive() -> None:
    text = "# escape=`\nFROM a\nCOPY <<EOF /x\na\\$B `$B\nEOF\n"
    copy = parse_dockerfile(text).stages[0].instructions[0]
    assert isinstance(copy, CopyInstruction)
    assert copy.expand({"B": "b"}).contents[0].data == "a$B `b\n"


# -- RUN -------------------------------------------------------------------------------------------------------------


def test_run_flags() -> None:
    run = one(
        "RUN --mount=type=cache,target=/root/.cache,id=pip,sharing=locked --mount=target=/src,rw "
        "--mount=type=secret,id=tok,required --mount=from=build,src=/out,dst=/in,ro=false "
        "--network=none --security=insecure make"
    )
    assert isinstance(run, RunInstruction)
    assert (run.network, run.security, run.args, run.prepend_shell) == ("none", "insecure", ("make",), True)
    assert run.mounts[0] == "type=cache,target=/root/.cache,id=pip,sharing=locked"
    assert run.mount_options == (
        {"type": "cache", "target": "/root/.cache", "id": "pip", "sharing": "locked", "readonly": "false"},
        {"type": "bind", "target": "/src", "readonly": "false"},
        {"type": "secret", "id": "tok", "required": "true", "readonly": "true"},
        {"type": "bind", "from": "build", "source": "/out", "target": "/in", "readonly": "false"},
    )
    assert run.expand({}).mount_options == run.mount_options


def test_run_defaults_and_exec_form() -> None:
    run = one('RUN ["echo", "$HOME"]')
    assert isinstance(run, RunInstruction)
    assert (run.args, run.prepend_shell, run.network, run.security) == (("echo", "$HOME"), False, "default", "sandbox")
    assert run.expand({"HOME": "/x"}).args == ("echo", "$HOME")  # the builder never expands RUN's command


def test_run_mount_values_are_expanded_and_validated() -> None:
    run = one("RUN --mount=type=$T,target=$DIR,id=${ID:-default},uid=$UID echo")
    assert isinstance(run, RunInstruction)
    expanded = run.expand({"T": "cache", "DIR": "/c", "UID": "1000"})
    assert expanded.mount_options == (
        {"type": "cache", "target": "/c", "id": "default", "uid": "1000", "readonly": "false"},
    )
    with pytest.raises(DockerfileError, match=r'^Dockerfile:2: unsupported mount type "cahce" \(did you mean cache'):
        run.expand({"T": "cahce", "UID": "1"})
    with pytest.raises(DockerfileError, match=r'uid not allowed for "bind" type mounts'):
        run.expand({"T": "bind", "UID": "1"})


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ("type=bind,target=/x,foo=1", "unexpected key 'foo' in 'foo=1'"),
        ("type=bind,target=/x,readonly=maybe", "invalid value for readonly: maybe"),
        ("type=bind,size=10m,target=/x", "unexpected key 'size' for mount type 'bind'"),
        ("type=tmpfs,size=lots,target=/x", "invalid value for size: lots"),
        ("type=cache,target=/x,mode=999", "invalid value 999 for mode"),
        ("type=cache,target=/x,sharing=all", 'unsupported sharing value "all"'),
        ("type=bind,target=/x,sharing=shared", "invalid cache sharing set for bind mount"),
        ("type=secret,from=x,id=a", "secret mount should not have a from"),
        ("type=secret", "invalid secret mount. one of source, target required"),
        ("type=secret,id=a,src=b", "both source and id can't be set"),
        ("type=bind,required,target=/x", "unexpected key 'required' for mount type 'bind'"),
        ("type=bind,target=/x,junk", "invalid field 'junk' must be a key=value pair"),
    ],
)
def test_run_mount_errors_at_expansion(mount: str, message: str) -> None:
    run = one(f"RUN --mount={mount} x")
    with pytest.raises(DockerfileError) as info:
        run.expand({})
    assert str(info.value).startswith("Dockerfile:2: ") and message in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("RUN --mount=from=$STAGE,target=/x y", "'from' doesn't support variable expansion, define alias stage"),
        ("RUN --network=bridge x", 'network mode "bridge" not supported'),
        ("RUN --security=privileged x", 'security "privileged" is not valid'),
        ("RUN --mnt=type=bind x", "unknown flag: --mnt (did you mean --mount?)"),
        ("RUN --device=x y", "unknown flag: --device"),
        ("RUN --network=none --network=host x", "Duplicate flag specified: network"),
    ],
)
def test_run_errors_at_parse(line: str, message: str) -> None:
    text = error(line)
    assert text.startswith("Dockerfile:2: ") and message in text


@pytest.mark.parametrize("mount", ['type=bind,target=a\\"b', '\\"type=bind', '\\"a\\"b', ""])
def test_run_mount_csv_errors_like_go(mount: str) -> None:
    # Flag words lose quotes unless escaped; Go's encoding/csv rejects bare or unbalanced quotes.
    assert "failed to parse csv mounts" in error(f"RUN --mount={mount} y")


def test_run_mount_quoted_csv_fields() -> None:
    run = one('RUN --mount=type=bind,\\"target=/a,b\\",\\"source=x\\"\\"y\\" z')
    assert isinstance(run, RunInstruction)
    assert run.mount_options == ({"type": "bind", "target": "/a,b", "source": 'x"y', "readonly": "true"},)


def test_run_script_for_heredocs() -> None:
    def script(body: str) -> RunScript:
        run = parse_dockerfile("FROM a\n" + body).stages[0].instructions[0]
        assert isinstance(run, RunInstruction)
        return run.script()

    assert script("RUN echo hi\n") == RunScript(("echo hi",), True, None)
    assert script("RUN <<EOF\nset -e\n$X\nEOF\n") == RunScript(("set -e\n$X\n",), True, None)
    assert script("RUN <<-EOF\n\tset -e\nEOF\n") == RunScript(("set -e\n",), True, None)
    assert script("RUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n") == RunScript(
        ("/dev/pipes/EOF",), True, ("EOF", "#!/usr/bin/env python3\nprint(1)\n")
    )
    assert script("RUN python3 <<EOF > /out\nprint(1)\nEOF\n") == RunScript(
        ("python3 <<EOF > /out\nprint(1)\nEOF",), True, None
    )


# -- unknown instructions and flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("RUNN echo", "unknown instruction: RUNN (did you mean RUN?)"),
        ("COPPY x y", "unknown instruction: COPPY (did you mean COPY?)"),
        ("EXPOS 80", "unknown instruction: EXPOS (did you mean EXPOSE?)"),
        ("frobnicate x", "unknown instruction: FROBNICATE"),
    ],
)
def test_unknown_instruction_suggests(line: str, message: str) -> None:
    text = "FROM a\nRUN ok \\\n  ok\n" + line + "\n"
    with pytest.raises(DockerfileError) as info:
        parse_dockerfile(text)
    assert str(info.value) == f"Dockerfile:4: {message}"
    assert info.value.line == 4 and info.value.file == "Dockerfile"


def test_unknown_instruction_suggestion_for_a_long_keyword() -> None:
    assert error("WORKDIRR /x") == "Dockerfile:2: unknown instruction: WORKDIRR (did you mean WORKDIR?)"


@pytest.mark.parametrize(
    ("line", "flag"),
    [
        ("WORKDIR --x=1 /a", "--x"),
        ("USER --x=1 a", "--x"),
        ("VOLUME --x=1 /a", "--x"),
        ("EXPOSE --x=1 80", "--x"),
        ("MAINTAINER --x=1 me", "--x"),
        ("ENTRYPOINT --x=1 a", "--x"),
        ("SHELL --x=1 []", "--x"),
        ("HEALTHCHECK --x=1 CMD a", "--x"),
    ],
)
def test_unknown_flags_name_the_flag_and_line(line: str, flag: str) -> None:
    assert error(line) == f"Dockerfile:2: unknown flag: {flag}"
