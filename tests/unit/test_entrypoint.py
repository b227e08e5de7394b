"""entrypoint.py (the GitHub Action): inputs → ``imgci login`` / ``imgci run`` argv, secrets kept out of argv."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RUN = [
    "run",
    "build.yaml",
    "--isolation=auto",
    "--github-checks=check-run",
    "--metadata-file=imgci-metadata.json",
    "--report=github",
    "--progress=plain",
]


def load_entrypoint() -> ModuleType:
    """entrypoint.py is a script at the repository root, not part of the package: load it by path."""
    spec = importlib.util.spec_from_file_location("imgci_action_entrypoint", REPO / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


entrypoint = load_entrypoint()


@dataclass
class Call:
    argv: list[str]
    stdin: str
    env: dict[str, str]
    cwd: str
    docker_config_mode: int | None


class FakeImgci:
    """Stands in for ``imgci.cli.main``: records each call; ``login`` writes a config.json like the real one."""

    def __init__(self, codes: Mapping[str, int] | None = None) -> None:
        self.calls: list[Call] = []
        self.codes = dict(codes or {})

    def __call__(self, argv: list[str]) -> int:
        stdin, mode = "", None
        if argv[0] == "login":
            stdin = sys.stdin.read()
            config_dir = Path(os.environ["DOCKER_CONFIG"])
            mode = stat.S_IMODE(config_dir.stat().st_mode)
            (config_dir / "config.json").write_text('{"auths": {"x": {"auth": "secret-ish"}}}')
        self.calls.append(Call(list(argv), stdin, dict(os.environ), os.getcwd(), mode))
        return self.codes.get(argv[0], 0)

    @property
    def runs(self) -> list[Call]:
        return [c for c in self.calls if c.argv[0] == "run"]

    @property
    def logins(self) -> list[Call]:
        return [c for c in self.calls if c.argv[0] == "login"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No inputs, tokens or docker config from the machine running the tests; cwd in a fresh directory."""
    for key in list(os.environ):
        if key.startswith(("INPUT_", "IMGCI_", "GITHUB_", "DOCKER_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "host-docker"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work


def stay(env: Mapping[str, str]) -> tuple[str, str]:
    """A chooser that keeps imgci in this process, whoever runs the tests (the choice has its own tests below)."""
    return entrypoint.CURRENT, ""


def run(env: Mapping[str, str] | None, fake: FakeImgci | None = None) -> tuple[int, FakeImgci]:
    fake = fake or FakeImgci()
    return entrypoint.main(env, argv_runner=fake, chooser=stay), fake


def inputs(**values: str) -> dict[str, str]:
    """INPUT_* variables as GitHub sets them for a docker action: upper case, hyphens kept."""
    return {"INPUT_" + name.replace("_", "-").upper(): value for name, value in values.items()}


# -- inputs → argv -------------------------------------------------------------------------------------------------
def test_defaults_give_a_plain_run_with_github_reporting() -> None:
    code, fake = run({})
    assert code == 0
    assert [c.argv for c in fake.calls] == [DEFAULT_RUN]


def test_every_option_maps_onto_run_flags() -> None:
    env = inputs(
        config="ci/build.yaml",
        targets="app, worker\n\n  docs  \n",
        set="*.platforms=linux/amd64,linux/arm64\napp.args.VERSION=1.2\n",
        push="true",
        keep_going="true",
        cache_from="type=registry,ref=ghcr.io/o/r:cache\ntype=local,src=.c",
        cache_to="type=registry,ref=ghcr.io/o/r:cache,mode=max",
        github_checks="status",
        pr_comment="true",
        isolation="chroot",
        insecure_registries="reg.local:5000, other:5000\nthird",
        metadata_file="out/meta.json",
    )
    code, fake = run(env)
    assert code == 0
    assert fake.runs[0].argv == [
        "run",
        "ci/build.yaml",
        "--only=app",
        "--only=worker",
        "--only=docs",
        "--set=*.platforms=linux/amd64,linux/arm64",  # commas inside a --set value are kept
        "--set=app.args.VERSION=1.2",
        "--push",
        "--keep-going",
        "--cache-from=type=registry,ref=ghcr.io/o/r:cache",
        "--cache-from=type=local,src=.c",
        "--cache-to=type=registry,ref=ghcr.io/o/r:cache,mode=max",
        "--isolation=chroot",
        "--github-checks=status",
        "--pr-comment",
        "--metadata-file=out/meta.json",
        "--report=github",
        "--insecure-registry=reg.local:5000",
        "--insecure-registry=other:5000",
        "--insecure-registry=third",
        "--progress=plain",
    ]


@pytest.mark.parametrize(
    ("push", "flags"),
    [("", []), ("true", ["--push"]), ("True", ["--push"]), ("false", ["--no-push"]), ("FALSE", ["--no-push"])],
)
def test_push_is_tri_state(push: str, flags: list[str]) -> None:
    _, fake = run(inputs(push=push))
    argv = fake.runs[0].argv
    assert [a for a in argv if a in ("--push", "--no-push")] == flags


@pytest.mark.parametrize("name", ["keep-going", "pr-comment"])
@pytest.mark.parametrize(
    ("value", "on"), [("true", True), ("TRUE", True), ("false", False), ("False", False), ("", False)]
)
def test_boolean_inputs(name: str, value: str, on: bool) -> None:
    _, fake = run({f"INPUT_{name.upper()}": value})
    assert (f"--{name}" in fake.runs[0].argv) is on


@pytest.mark.parametrize(("name", "value"), [("keep-going", "yes"), ("pr-comment", "1"), ("push", "maybe")])
def test_a_bad_boolean_is_an_error_before_anything_runs(
    name: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, fake = run({f"INPUT_{name.upper()}": value, **inputs(registry="r", username="u", password="p")})
    assert code == 2
    assert fake.calls == []
    out = capsys.readouterr().out
    assert f"::error::input {name} must be true or false" in out


def test_underscore_spellings_are_accepted_and_github_spelling_wins() -> None:
    _, fake = run({"INPUT_KEEP_GOING": "true", "INPUT_METADATA_FILE": "a.json"})
    assert "--keep-going" in fake.runs[0].argv
    assert "--metadata-file=a.json" in fake.runs[0].argv
    _, fake = run({"INPUT_METADATA-FILE": "github.json", "INPUT_METADATA_FILE": "other.json"})
    assert "--metadata-file=github.json" in fake.runs[0].argv


def test_empty_inputs_fall_back_to_the_action_defaults() -> None:
    _, fake = run(inputs(config="  ", isolation="", working_directory="", github_checks=""))
    assert fake.runs[0].argv == DEFAULT_RUN


def test_values_that_look_like_options_stay_values() -> None:
    _, fake = run(inputs(config="-weird.yaml", targets="--push"))
    argv = fake.runs[0].argv
    assert argv[1] == "./-weird.yaml"
    assert "--only=--push" in argv and "--push" not in argv


def test_progress_follows_imgci_progress() -> None:
    _, fake = run({"IMGCI_PROGRESS": "json"})
    assert fake.runs[0].argv[-1] == "--progress=json"


def test_the_run_argv_parses_with_the_real_cli() -> None:
    import imgci.cli

    parser = imgci.cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert subcommands is not None
    if "run" not in subcommands:
        pytest.skip("imgci run is not in the CLI yet")
    env = inputs(targets="a,b", set="a.x=1", push="false", keep_going="true", cache_from="type=local,src=c")
    env.update(inputs(cache_to="type=local,dest=c", pr_comment="true", insecure_registries="h:5000"))
    _, fake = run(env)
    args = parser.parse_args(fake.runs[0].argv)
    assert args.command == "run"


# -- login and secrets ---------------------------------------------------------------------------------------------
LOGIN = inputs(registry="ghcr.io", username="octo", password="s3cret-pw", github_token="ghs_tok3n")


def test_login_gets_the_password_on_stdin_only(clean_env: Path, tmp_path: Path) -> None:
    code, fake = run(LOGIN)
    assert code == 0
    assert [c.argv[0] for c in fake.calls] == ["login", "run"]
    login = fake.logins[0]
    assert login.argv == ["login", "ghcr.io", "-u", "octo", "--password-stdin"]
    assert login.stdin == "s3cret-pw\n"
    for call in fake.calls:
        assert not any("s3cret-pw" in a for a in call.argv)
        assert not any("s3cret-pw" in v for v in call.env.values())


def test_login_uses_a_private_docker_config_that_run_sees_and_that_is_removed(tmp_path: Path) -> None:
    _, fake = run(LOGIN)
    login, run_call = fake.calls
    config_dir = login.env["DOCKER_CONFIG"]
    assert config_dir != str(tmp_path / "host-docker")
    assert login.docker_config_mode == 0o700
    assert run_call.env["DOCKER_CONFIG"] == config_dir
    assert not Path(config_dir).exists()
    assert os.environ["DOCKER_CONFIG"] == str(tmp_path / "host-docker")
    assert not (tmp_path / "host-docker").exists()  # the login never wrote the runner's own config


def test_existing_logins_are_carried_into_the_private_config(tmp_path: Path) -> None:
    host = tmp_path / "host-docker"
    host.mkdir()
    (host / "config.json").write_text('{"auths": {"private.example": {"auth": "eA=="}}}')
    seen: list[str] = []

    def runner(argv: list[str]) -> int:
        seen.append((Path(os.environ["DOCKER_CONFIG"]) / "config.json").read_text())
        return 0

    assert entrypoint.main(LOGIN, argv_runner=runner, chooser=stay) == 0
    assert "private.example" in seen[0]
    assert (host / "config.json").read_text() == '{"auths": {"private.example": {"auth": "eA=="}}}'


def test_login_passes_insecure_registries() -> None:
    _, fake = run({**LOGIN, **inputs(insecure_registries="ghcr.io")})
    assert fake.logins[0].argv[-1] == "--insecure-registry=ghcr.io"


def test_the_real_cli_accepts_the_login_argv() -> None:
    import imgci.cli

    _, fake = run({**LOGIN, **inputs(insecure_registries="a:5000,b")})
    args = imgci.cli.build_parser().parse_args(fake.logins[0].argv)
    assert (args.server, args.username, args.password_stdin, args.password) == ("ghcr.io", "octo", True, None)
    assert args.insecure_registry == ["a:5000", "b"]


def test_secrets_are_masked_before_anything_else_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    run(LOGIN)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["::add-mask::s3cret-pw", "::add-mask::ghs_tok3n"]
    assert not any("s3cret-pw" in line or "ghs_tok3n" in line for line in lines[2:])


def test_a_multi_line_password_is_masked_line_by_line_and_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    run({**LOGIN, **inputs(password="line-1%\nline-2")})
    out = capsys.readouterr().out.splitlines()
    assert "::add-mask::line-1%25" in out and "::add-mask::line-2" in out


def test_the_token_goes_through_the_environment_not_argv() -> None:
    _, fake = run(inputs(github_token="ghs_tok3n"))
    call = fake.runs[0]
    assert call.env["IMGCI_GITHUB_TOKEN"] == "ghs_tok3n"
    assert not any("ghs_tok3n" in a for a in call.argv)
    assert "IMGCI_GITHUB_TOKEN" not in os.environ


def test_no_token_no_token_variable() -> None:
    _, fake = run({})
    assert "IMGCI_GITHUB_TOKEN" not in fake.runs[0].env


def test_secret_inputs_are_removed_from_the_environment_imgci_runs_with(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LOGIN.items():
        monkeypatch.setenv(key, value)
    code, fake = run(None)  # the real thing: inputs from os.environ
    assert code == 0
    for call in fake.calls:
        assert "INPUT_PASSWORD" not in call.env and "INPUT_GITHUB-TOKEN" not in call.env
        assert call.env["INPUT_REGISTRY"] == "ghcr.io"
    assert os.environ["INPUT_PASSWORD"] == "s3cret-pw"  # put back afterwards


def test_a_failed_login_stops_before_the_run() -> None:
    code, fake = run(LOGIN, FakeImgci({"login": 1}))
    assert code == 1
    assert [c.argv[0] for c in fake.calls] == ["login"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"registry": "ghcr.io", "password": "p"}, "input username is required when password is set"),
        ({"username": "u", "password": "p"}, "input registry is required when password is set"),
    ],
)
def test_incomplete_credentials_are_an_error(
    values: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, fake = run(inputs(**values))
    assert code == 2 and fake.calls == []
    assert f"::error::{message}" in capsys.readouterr().out


def test_a_username_without_password_builds_without_logging_in(capsys: pytest.CaptureFixture[str]) -> None:
    # secrets are empty in pull requests from forks
    code, fake = run(inputs(registry="ghcr.io", username="octo"))
    assert code == 0
    assert [c.argv[0] for c in fake.calls] == ["run"]
    assert "::warning::input username is set but password is empty" in capsys.readouterr().out


# -- working directory and exit status -----------------------------------------------------------------------------
def test_working_directory_is_honoured_and_restored(clean_env: Path) -> None:
    (clean_env / "sub" / "dir").mkdir(parents=True)
    _, fake = run(inputs(working_directory="sub/dir"))
    assert fake.runs[0].cwd == str(clean_env / "sub" / "dir")
    assert os.getcwd() == str(clean_env)


def test_a_missing_working_directory_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, fake = run(inputs(working_directory="nope"))
    assert code == 2 and fake.calls == []
    assert "::error::input working-directory: cannot change to 'nope'" in capsys.readouterr().out


@pytest.mark.parametrize("status", [0, 1, 2, 130])
def test_the_run_status_is_the_exit_status(status: int) -> None:
    code, _ = run(LOGIN, FakeImgci({"run": status}))
    assert code == status


def test_process_state_is_restored() -> None:
    before_env, before_stdin = dict(os.environ), sys.stdin
    run(LOGIN)
    assert dict(os.environ) == before_env
    assert sys.stdin is before_stdin


def test_the_script_runs_main_without_arguments() -> None:
    text = (REPO / "entrypoint.py").read_text()
    assert text.rstrip().endswith("sys.exit(main())")


def test_the_script_runs_a_command_given_as_arguments(tmp_path: Path) -> None:
    # GitLab's docker executor starts the image's ENTRYPOINT with the shell that runs the job's script
    env = {k: v for k, v in os.environ.items() if not k.startswith("INPUT_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, str(REPO / "entrypoint.py"), "sh", "-c", "echo from-the-shell; exit 3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (3, "from-the-shell\n")


def test_a_usage_error_from_the_real_cli_is_an_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    import imgci.cli

    assert entrypoint.main(inputs(isolation="bogus"), argv_runner=imgci.cli.main, chooser=stay) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


# -- which user builds ---------------------------------------------------------------------------------------------
User = entrypoint.User
UserT = Any  # UserT in annotations: mypy cannot see into a module loaded by path
IMGCI = User("imgci", 1001, 1001, "/home/imgci")
REFUSED = "user namespaces are refused for the unprivileged user here (unshare: Operation not permitted)"
FALLBACK = "; building as root with --isolation auto (chroot when user namespaces are refused)"


class Asked:
    """A fake probe or writability check: answers ``answer`` and counts who it was asked about."""

    def __init__(self, ok: bool = True, problem: str = "") -> None:
        self.answer = (ok, problem)
        self.users: list[str] = []

    def __call__(self, user: UserT) -> tuple[bool, str]:
        self.users.append(user.name)
        return self.answer


def users(*known: UserT) -> Callable[[str], UserT | None]:
    by_name = {u.name: u for u in known}
    return by_name.get


def choose(
    env: Mapping[str, str],
    *,
    euid: int = 0,
    probe: Asked | None = None,
    writable: Asked | None = None,
    known: tuple[UserT, ...] = (IMGCI,),
) -> tuple[str, str]:
    return entrypoint.choose_user(env, probe or Asked(), writable or Asked(), euid=euid, lookup=users(*known))


# (case, env, euid, probe, writable, known users, who, message)
CHOICES: list[tuple[Any, ...]] = [
    ("not root: stays, silently", {}, 1000, Asked(), Asked(), (IMGCI,), "", ""),
    ("root, user missing: stays, silently", {}, 0, Asked(), Asked(), (), "", ""),
    (
        "root, userns works, writable: switches",
        {},
        0,
        Asked(),
        Asked(),
        (IMGCI,),
        "imgci",
        "imgci: building as imgci (uid 1001): user namespaces with subordinate ids work for it",
    ),
    (
        "root, userns refused: root",
        {},
        0,
        Asked(False, REFUSED),
        Asked(),
        (IMGCI,),
        "root",
        f"imgci: {REFUSED}{FALLBACK}",
    ),
    (
        "root, workspace not writable: root",
        {},
        0,
        Asked(),
        Asked(False, "/github/workspace is not writable by imgci (uid 1001)"),
        (IMGCI,),
        "root",
        f"imgci: /github/workspace is not writable by imgci (uid 1001){FALLBACK}",
    ),
    (
        "IMGCI_RUN_AS=root",
        {"IMGCI_RUN_AS": "root"},
        0,
        Asked(),
        Asked(),
        (IMGCI,),
        "root",
        "imgci: building as root (IMGCI_RUN_AS=root)",
    ),
    (
        "IMGCI_RUN_AS=imgci",
        {"IMGCI_RUN_AS": "imgci"},
        0,
        Asked(),
        Asked(),
        (IMGCI,),
        "imgci",
        "imgci: building as imgci (uid 1001): user namespaces with subordinate ids work for it",
    ),
    (
        "IMGCI_RUN_AS=auto decides",
        {"IMGCI_RUN_AS": " auto "},
        0,
        Asked(False, REFUSED),
        Asked(),
        (IMGCI,),
        "root",
        f"imgci: {REFUSED}{FALLBACK}",
    ),
    ("IMGCI_RUN_AS=imgci as imgci itself", {"IMGCI_RUN_AS": "imgci"}, 1001, Asked(), Asked(), (IMGCI,), "", ""),
    (
        "input isolation chroot needs root",
        {"INPUT_ISOLATION": "chroot"},
        0,
        Asked(),
        Asked(),
        (IMGCI,),
        "root",
        "imgci: building as root: input isolation is chroot, which needs root",
    ),
    (
        "input isolation userns: no chroot fallback promised",
        {"INPUT_ISOLATION": "userns"},
        0,
        Asked(False, REFUSED),
        Asked(),
        (IMGCI,),
        "root",
        f"imgci: {REFUSED}; building as root with --isolation userns",
    ),
    (
        "IMGCI_USER names another user",
        {"IMGCI_USER": "builder"},
        0,
        Asked(),
        Asked(),
        (IMGCI, User("builder", 2000, 2000, "/home/builder")),
        "builder",
        "imgci: building as builder (uid 2000): user namespaces with subordinate ids work for it",
    ),
    (
        "IMGCI_USER names root: nothing to drop",
        {"IMGCI_USER": "root"},
        0,
        Asked(),
        Asked(),
        (User("root", 0, 0, "/root"),),
        "",
        "",
    ),
]


@pytest.mark.parametrize(
    ("case", "env", "euid", "probe", "writable", "known", "who", "message"),
    [pytest.param(*row, id=row[0]) for row in CHOICES],
)
def test_choose_user(
    case: str,
    env: dict[str, str],
    euid: int,
    probe: Asked,
    writable: Asked,
    known: tuple[UserT, ...],
    who: str,
    message: str,
) -> None:
    assert choose(env, euid=euid, probe=probe, writable=writable, known=known) == (who, message), case


def test_the_probes_are_asked_only_when_the_answer_depends_on_them() -> None:
    for env, euid, known in [({}, 1000, (IMGCI,)), ({"IMGCI_RUN_AS": "root"}, 0, (IMGCI,)), ({}, 0, ())]:
        probe, writable = Asked(), Asked()
        choose(env, euid=euid, probe=probe, writable=writable, known=known)
        assert probe.users == writable.users == []
    probe, writable = Asked(False, REFUSED), Asked()
    choose({}, probe=probe, writable=writable)
    assert (probe.users, writable.users) == (["imgci"], [])  # no point checking the workspace
    probe, writable = Asked(), Asked()
    choose({"IMGCI_USER": "builder"}, probe=probe, writable=writable, known=(User("builder", 2, 2, "/"),))
    assert probe.users == writable.users == ["builder"]


@pytest.mark.parametrize(
    ("env", "euid", "probe", "writable", "known", "error"),
    [
        ({"IMGCI_RUN_AS": "imgci"}, 0, Asked(False, REFUSED), Asked(), (IMGCI,), f"IMGCI_RUN_AS=imgci, but {REFUSED}"),
        (
            {"IMGCI_RUN_AS": "imgci"},
            0,
            Asked(),
            Asked(False, "/w is not writable by imgci (uid 1001)"),
            (IMGCI,),
            "IMGCI_RUN_AS=imgci, but /w is not writable by imgci (uid 1001)",
        ),
        ({"IMGCI_RUN_AS": "imgci"}, 0, Asked(), Asked(), (), "IMGCI_RUN_AS=imgci, but there is no user imgci here"),
        (
            {"IMGCI_RUN_AS": "imgci", "INPUT_ISOLATION": "chroot"},
            0,
            Asked(),
            Asked(),
            (IMGCI,),
            "IMGCI_RUN_AS=imgci, but input isolation is chroot, which needs root",
        ),
        ({"IMGCI_RUN_AS": "imgci"}, 1000, Asked(), Asked(), (IMGCI,), "runs as uid 1000 and cannot switch users"),
        ({"IMGCI_RUN_AS": "root"}, 1000, Asked(), Asked(), (IMGCI,), "runs as uid 1000 and cannot become root"),
        ({"IMGCI_RUN_AS": "nobody"}, 0, Asked(), Asked(), (IMGCI,), "IMGCI_RUN_AS must be root, imgci or auto"),
    ],
)
def test_imgci_run_as_that_cannot_be_honoured_is_an_error(
    env: dict[str, str],
    euid: int,
    probe: Asked,
    writable: Asked,
    known: tuple[UserT, ...],
    error: str,
) -> None:
    with pytest.raises(entrypoint.RunAsError, match=re.escape(error)):
        choose(env, euid=euid, probe=probe, writable=writable, known=known)


# -- main with a chosen user ---------------------------------------------------------------------------------------
@dataclass
class UserCall:
    user: UserT
    command: list[str]
    env: dict[str, str]
    cwd: str
    config: str | None  # config.json in DOCKER_CONFIG, read while the command "runs"
    config_owner: tuple[int, int]


class FakeUserRunner:
    def __init__(self, status: int = 0) -> None:
        self.calls: list[UserCall] = []
        self.status = status

    def __call__(self, user: UserT, command: list[str], env: Mapping[str, str]) -> int:
        config_dir = Path(env["DOCKER_CONFIG"])
        config = config_dir / "config.json"
        st = config_dir.stat()
        text = config.read_text() if config.exists() else None
        self.calls.append(UserCall(user, list(command), dict(env), os.getcwd(), text, (st.st_uid, st.st_gid)))
        return self.status


# The current user stands in for imgci: handing the docker config over (chown) then works without root.
ME = User("imgci", os.geteuid(), os.getegid(), "/home/imgci")


def switch(why: str = "imgci: building as imgci (uid 1001): …") -> Callable[[Mapping[str, str]], tuple[str, str]]:
    return lambda env: ("imgci", why)


def test_a_switch_runs_imgci_run_as_the_user_with_the_private_docker_config(
    tmp_path: Path, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, as_user = FakeImgci(), FakeUserRunner(status=3)
    code = entrypoint.main(LOGIN, argv_runner=fake, chooser=switch(), user_runner=as_user, lookup=users(ME))
    assert code == 3  # the user's run's status
    assert [c.argv[0] for c in fake.calls] == ["login"]  # the login ran here, the run did not
    (call,) = as_user.calls
    assert call.user == ME
    assert call.command == [sys.executable, "-m", "imgci", *DEFAULT_RUN]
    assert call.cwd == str(clean_env)
    assert call.env["DOCKER_CONFIG"] == fake.logins[0].env["DOCKER_CONFIG"]
    assert call.config is not None and "secret-ish" in call.config  # what the login wrote
    assert call.config_owner == (ME.uid, ME.gid)
    assert (call.env["HOME"], call.env["USER"]) == ("/home/imgci", "imgci")
    assert call.env["IMGCI_STATE"] == "/home/imgci/.local/share/imgci"
    assert call.env["IMGCI_GITHUB_TOKEN"] == "ghs_tok3n"
    assert not any("s3cret-pw" in v for v in call.env.values())
    assert not any(k.startswith(("INPUT_PASSWORD", "INPUT_GITHUB")) for k in call.env)
    assert not Path(call.env["DOCKER_CONFIG"]).exists()  # removed afterwards
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["imgci: building as imgci (uid 1001): …", f"imgci {' '.join(DEFAULT_RUN)}"]


def test_a_switch_without_login_still_carries_the_runners_logins(tmp_path: Path) -> None:
    host = tmp_path / "host-docker"
    host.mkdir()
    (host / "config.json").write_text('{"auths": {"private.example": {"auth": "eA=="}}}')
    as_user = FakeUserRunner()
    code = entrypoint.main({}, argv_runner=FakeImgci(), chooser=switch(), user_runner=as_user, lookup=users(ME))
    assert code == 0
    (call,) = as_user.calls
    assert call.env["DOCKER_CONFIG"] != str(host)
    assert call.config == '{"auths": {"private.example": {"auth": "eA=="}}}'
    assert os.environ["DOCKER_CONFIG"] == str(host)


def test_an_imgci_state_that_is_set_is_kept_for_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCI_STATE", "/srv/imgci-state")
    as_user = FakeUserRunner()
    entrypoint.main({}, argv_runner=FakeImgci(), chooser=switch(), user_runner=as_user, lookup=users(ME))
    assert as_user.calls[0].env["IMGCI_STATE"] == "/srv/imgci-state"


def test_staying_root_prints_why_and_runs_here(capsys: pytest.CaptureFixture[str]) -> None:
    fake, as_user = FakeImgci(), FakeUserRunner()
    why = f"imgci: {REFUSED}{FALLBACK}"
    code = entrypoint.main({}, argv_runner=fake, chooser=lambda env: ("root", why), user_runner=as_user)
    assert code == 0 and as_user.calls == []
    assert [c.argv for c in fake.calls] == [DEFAULT_RUN]
    assert capsys.readouterr().out.splitlines()[-2:] == [why, f"imgci {' '.join(DEFAULT_RUN)}"]


def test_an_impossible_imgci_run_as_stops_before_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeImgci()
    code = entrypoint.main({"IMGCI_RUN_AS": "nobody"}, argv_runner=fake, user_runner=FakeUserRunner())
    assert code == 2 and fake.calls == []
    assert "::error::IMGCI_RUN_AS must be root, imgci or auto (got 'nobody')" in capsys.readouterr().out


def test_without_the_user_the_real_chooser_keeps_imgci_in_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    fake, as_user = FakeImgci(), FakeUserRunner()
    env = {"IMGCI_USER": "no-such-user-imgci-test"}
    assert entrypoint.main(env, argv_runner=fake, user_runner=as_user) == 0
    assert [c.argv for c in fake.calls] == [DEFAULT_RUN] and as_user.calls == []
    assert not any(line.startswith("imgci: ") for line in capsys.readouterr().out.splitlines())


def test_run_as_passes_sigterm_on_and_reports_the_signal() -> None:
    # As PID 1 of a container the entrypoint would ignore docker stop's SIGTERM; the build must get it.
    me = User("me", os.geteuid(), os.getegid(), str(Path.home()))
    assert entrypoint.setpriv_argv(me) == []
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    timer.start()
    try:
        status = entrypoint.run_as(me, [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ))
    finally:
        timer.cancel()
    assert status == 128 + signal.SIGTERM
    assert time.monotonic() - started < 20
    assert signal.getsignal(signal.SIGTERM) == before


def test_setpriv_switches_uid_gid_and_groups() -> None:
    uid, gid = os.geteuid() + 1, os.getegid() + 2  # someone else
    other = User("someone", uid, gid, "/nonexistent")
    assert entrypoint.setpriv_argv(other) == ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]


# -- the real thing, with this machine's rootless test user --------------------------------------------------------
REAL_USER = "imgci-rootless"


@pytest.fixture
def real_user() -> UserT:
    """The unprivileged user of the rootless integration tests (tests/integration/rootless.py makes it, with
    subuid and subgid ranges)."""
    found = entrypoint.lookup_user(REAL_USER)
    if found is None:
        pytest.skip(f"no user {REAL_USER} here (the rootless integration tests create it)")
    return found


def test_the_real_probe_gives_a_definite_answer(real_user: UserT) -> None:
    started = time.monotonic()
    ok, problem = entrypoint.probe_userns(real_user)
    assert time.monotonic() - started < 30
    assert isinstance(ok, bool)
    if ok:
        assert problem == ""
    else:
        assert problem.strip()


def test_the_real_probe_sees_a_refusal(real_user: UserT, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCI_SANDBOX_PROBE_DENY", "userns")  # imgci's test hook: the userns probe fails
    ok, problem = entrypoint.probe_userns(real_user)
    assert not ok
    assert problem.startswith(entrypoint.USERNS_REFUSED)
    if os.geteuid() == 0:  # not root: setpriv itself is refused, which is a refusal too
        assert "denied by IMGCI_SANDBOX_PROBE_DENY" in problem


def test_the_real_choice_when_the_workspace_is_closed_to_the_user(
    real_user: UserT, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pytest's tmp_path is private to the user running the tests
    who, why = entrypoint.choose_user({"IMGCI_USER": REAL_USER})
    if os.geteuid() != 0:
        assert (who, why) == (entrypoint.CURRENT, "")
        return
    assert who == "root"
    assert why.endswith(FALLBACK)
    ok, _ = entrypoint.probe_userns(real_user)
    if ok:
        assert f"{clean_env} is not writable by {REAL_USER} (uid {real_user.uid})" in why


def test_the_real_switch_end_to_end(
    real_user: UserT, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As root: main probes for real, hands the docker config over and runs a command as the user for real (a
    stand-in for `python -m imgci run` that reports who it runs as and what it can read and write)."""
    workspace = Path(tempfile.mkdtemp(prefix="imgci-entrypoint-test-"))
    try:
        if os.geteuid() == 0:
            os.chown(workspace, real_user.uid, real_user.gid)
        monkeypatch.chdir(workspace)
        report = workspace / "report.json"
        stand_in = (
            "import json, os, sys\n"
            "config = os.path.join(os.environ['DOCKER_CONFIG'], 'config.json')\n"
            "open('written-by-the-build', 'w').write('x')\n"
            "json.dump({'uid': os.getuid(), 'gid': os.getgid(), 'config': open(config).read(),\n"
            "           'home': os.environ['HOME'], 'argv': sys.argv[1:]}, open('report.json', 'w'))\n"
            "sys.exit(5)\n"
        )
        commands: list[list[str]] = []

        def real_runner(user: UserT, command: list[str], env: Mapping[str, str]) -> int:
            commands.append(command)
            return entrypoint.run_as(user, [sys.executable, "-c", stand_in, *command[3:]], env)

        fake = FakeImgci()
        env = {**LOGIN, "IMGCI_USER": REAL_USER}
        code = entrypoint.main(env, argv_runner=fake, user_runner=real_runner)
        out = capsys.readouterr().out
        if os.geteuid() != 0:  # nobody to switch to: imgci runs here
            assert code == 0 and [c.argv[0] for c in fake.calls] == ["login", "run"]
            return
        ok, problem = entrypoint.probe_userns(real_user)
        if not ok:  # user namespaces are closed to the user on this machine: root builds, and says why
            assert code == 0 and [c.argv[0] for c in fake.calls] == ["login", "run"]
            assert f"imgci: {problem}{FALLBACK}" in out
            return
        assert code == 5
        assert [c.argv[0] for c in fake.calls] == ["login"]
        assert commands == [[sys.executable, "-m", "imgci", *DEFAULT_RUN]]
        assert f"imgci: building as {REAL_USER} (uid {real_user.uid})" in out
        seen = json.loads(report.read_text())
        assert (seen["uid"], seen["gid"]) == (real_user.uid, real_user.gid)
        assert "secret-ish" in seen["config"]
        assert seen["home"] == real_user.home
        assert seen["argv"] == DEFAULT_RUN
        assert (workspace / "written-by-the-build").stat().st_uid == real_user.uid
    finally:
        shutil.rmtree(workspace)
