"""The GitHub Action's entry point: the action's inputs (``INPUT_*``) → one ``imgci run``, in this process.

Contract: :func:`main` reads the inputs action.yml declares (:data:`DEFAULTS` mirrors its defaults, for a run
without them), logs in first when ``password`` is set, then returns the exit status of ``imgci run`` (or of the
failed login). An input that is not valid prints one ``::error::`` line and returns 2 before anything runs.
Missing files and bad build.yaml contents are imgci's to report. ``main`` leaves ``os.environ``, the working
directory and ``sys.stdin`` as it found them.

Secrets: the password and the token are masked (``::add-mask::``) before anything else is printed. The password
reaches ``imgci login`` on stdin only, and the login is written to a private DOCKER_CONFIG (a 0700 temporary
directory, removed at the end) — never the runner's. The token reaches imgci as ``IMGCI_GITHUB_TOKEN``. Neither
is ever in an argv, and both ``INPUT_`` variables are removed from the environment imgci runs with.

How GitHub passes inputs to a docker action: ``INPUT_`` + the name upper-cased with spaces replaced by ``_`` and
hyphens kept (actions/runner ``Handler.AddInputsToEnvironment``), then ``docker run -e INPUT_KEEP-GOING …``. Such
names are not shell variables — a shell entrypoint would drop them — so the runner image starts this file with
python directly. The underscore spelling (``INPUT_KEEP_GOING``) is accepted too, for a hand-written ``docker run``.

Which user builds (:func:`choose_user`, after the inputs are checked and the login is done): a docker action is
started as root and cannot ask for another user, so the image's USER is root and this file decides. Started as root,
it asks the unprivileged user ``IMGCI_USER`` (default ``imgci``) whether user namespaces with its subordinate id
ranges work (``imgci doctor --isolation userns`` through ``setpriv``) and whether it may write the working
directory, ``$GITHUB_OUTPUT``, ``$GITHUB_STEP_SUMMARY`` and the state directory. Both yes: ``imgci run`` runs as
that user in a child process (the private DOCKER_CONFIG is handed over to it). Otherwise root builds, in this
process, after one line saying why (docker's default seccomp profile usually refuses user namespaces to an
unprivileged process; ``--isolation auto`` then picks chroot). ``IMGCI_RUN_AS=root`` keeps root without asking,
``IMGCI_RUN_AS=imgci`` (the user's name) makes the switch a requirement: an error when it cannot work. Not started
as root, or without such a user (outside the image), imgci runs as the current user and nothing is said.

Run as a script with arguments, it executes them instead (``exec "$@"``, the usual image entrypoint rule): GitHub
passes none to this action, while GitLab's docker executor passes the shell that runs a job's script. That
command runs as the user the container was started as.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imgci.cli

ArgvRunner = Callable[[list[str]], int]
# (usable, why not): why not is a clause for the message printed when root builds instead.
Check = tuple[bool, str]

# The inputs action.yml declares, with its defaults (github-token's default there is ${{ github.token }}).
DEFAULTS: dict[str, str] = {
    "config": "build.yaml",
    "targets": "",
    "set": "",
    "push": "",
    "keep-going": "false",
    "cache-from": "",
    "cache-to": "",
    "registry": "",
    "username": "",
    "password": "",
    "github-token": "",
    "github-checks": "check-run",
    "pr-comment": "false",
    "isolation": "auto",
    "insecure-registries": "",
    "working-directory": ".",
    "metadata-file": "imgci-metadata.json",
}
SECRET_INPUTS = ("password", "github-token")


class InputError(Exception):
    """An input that is not valid; the message names the input and never holds a secret."""


class RunAsError(InputError):
    """``IMGCI_RUN_AS`` asks for a user this process cannot build as."""


def input_env_keys(name: str) -> tuple[str, str]:
    """The environment variables that may hold input ``name``: GitHub's spelling first, then underscores."""
    github = "INPUT_" + name.replace(" ", "_").upper()
    return github, github.replace("-", "_")


def read_input(env: Mapping[str, str], name: str) -> str:
    """Input ``name``, trimmed like ``@actions/core`` getInput; unset or empty gives the action.yml default."""
    for key in input_env_keys(name):
        value = env.get(key, "").strip()
        if value:
            return value
    return DEFAULTS[name]


def split_lines(value: str) -> list[str]:
    """One item per non-empty line (for values that may contain commas: ``--set``, cache specs)."""
    return [line.strip() for line in value.splitlines() if line.strip()]


def split_items(value: str) -> list[str]:
    """Items separated by newlines or commas (target names, registry hosts)."""
    return [item.strip() for line in value.splitlines() for item in line.split(",") if item.strip()]


def parse_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise InputError(f"input {name} must be true or false (got {value!r})")
    return lowered == "true"


def parse_push(value: str) -> bool | None:
    """``""`` → None (each target's own ``push``), else a boolean."""
    return None if value == "" else parse_bool("push", value)


def escape_command_data(value: str) -> str:
    """Escape a workflow command's data as ``@actions/core`` does (``%``, CR and LF)."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def mask(value: str) -> None:
    """Ask the runner to hide ``value`` in the log: each line on its own, as a multi-line secret is printed."""
    for line in value.splitlines():
        if line.strip():
            print(f"::add-mask::{escape_command_data(line)}", flush=True)


@dataclass(frozen=True)
class Login:
    registry: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Invocation:
    """What one action run does: where, the login (if any), the token and the ``imgci run`` argv."""

    working_directory: str
    login: Login | None
    token: str = field(repr=False)
    insecure_registries: list[str]
    run_argv: list[str]
    warnings: list[str]


def plan_invocation(env: Mapping[str, str]) -> Invocation:
    """Turn the inputs into an :class:`Invocation`; raises :class:`InputError`. Touches nothing."""
    inputs = {name: read_input(env, name) for name in DEFAULTS}
    keep_going = parse_bool("keep-going", inputs["keep-going"])
    pr_comment = parse_bool("pr-comment", inputs["pr-comment"])
    push = parse_push(inputs["push"])
    insecure = split_items(inputs["insecure-registries"])

    warnings: list[str] = []
    login = None
    registry, username, password = inputs["registry"], inputs["username"], inputs["password"]
    if password:
        if not username:
            raise InputError("input username is required when password is set")
        if not registry:
            raise InputError("input registry is required when password is set (e.g. ghcr.io or docker.io)")
        login = Login(registry, username, password)
    elif username:
        # Secrets are empty in pull requests from forks: build without pushing rather than fail.
        warnings.append(f"input username is set but password is empty: not logging in to {registry or 'a registry'}")

    config = inputs["config"]
    # Values go as --option=VALUE so one that starts with "-" stays a value; the same for the positional path.
    argv = ["run", f"./{config}" if config.startswith("-") else config]
    argv += [f"--only={name}" for name in split_items(inputs["targets"])]
    argv += [f"--set={override}" for override in split_lines(inputs["set"])]
    if push is not None:
        argv.append("--push" if push else "--no-push")
    if keep_going:
        argv.append("--keep-going")
    argv += [f"--cache-from={spec}" for spec in split_lines(inputs["cache-from"])]
    argv += [f"--cache-to={spec}" for spec in split_lines(inputs["cache-to"])]
    argv += [f"--isolation={inputs['isolation']}", f"--github-checks={inputs['github-checks']}"]
    if pr_comment:
        argv.append("--pr-comment")
    argv += [f"--metadata-file={inputs['metadata-file']}", "--report=github"]
    argv += [f"--insecure-registry={host}" for host in insecure]
    # A docker action has no terminal: plain lines unless the workflow asks for another view.
    argv.append(f"--progress={env.get('IMGCI_PROGRESS') or 'plain'}")
    return Invocation(inputs["working-directory"], login, inputs["github-token"], insecure, argv, warnings)


@contextmanager
def restored_process_state() -> Iterator[None]:
    """Put ``os.environ``, the working directory and ``sys.stdin`` back as they were on the way out."""
    environ, cwd, stdin = dict(os.environ), os.getcwd(), sys.stdin
    try:
        yield
    finally:
        sys.stdin = stdin
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)


def _docker_config_file() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


def call(argv_runner: ArgvRunner, argv: list[str]) -> int:
    """``argv_runner(argv)``, with argparse's SystemExit (a usage error such as an unknown isolation) as a status."""
    try:
        return argv_runner(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def use_private_docker_config(config_dir: Path) -> None:
    """Make ``config_dir`` the process's DOCKER_CONFIG, with a copy of the logins in the current docker config (so
    base images from another private registry still resolve)."""
    existing = _docker_config_file()
    if existing.is_file() and existing.resolve() != (config_dir / "config.json").resolve():
        shutil.copyfile(existing, config_dir / "config.json")
        os.chmod(config_dir / "config.json", 0o600)
    os.environ["DOCKER_CONFIG"] = str(config_dir)


def login(invocation: Invocation, config_dir: Path, argv_runner: ArgvRunner) -> int:
    """``imgci login`` into ``config_dir`` (made the process's DOCKER_CONFIG) with the password on stdin."""
    assert invocation.login is not None
    use_private_docker_config(config_dir)
    argv = ["login", invocation.login.registry, "-u", invocation.login.username, "--password-stdin"]
    argv += [f"--insecure-registry={host}" for host in invocation.insecure_registries]
    sys.stdin = io.StringIO(invocation.login.password + "\n")
    return call(argv_runner, argv)


# -- which user builds ---------------------------------------------------------------------------------------------
CURRENT = ""  # choose_user's "who" for: stay the user this process is, say nothing
ROOT = "root"
DEFAULT_USER = "imgci"
CHECK_TIMEOUT = 20.0  # seconds for each check run as the user; the probes themselves take well under one
USERNS_REFUSED = "user namespaces are refused for the unprivileged user here"
# Exits 1 and names the paths that the user running it may not write (os.access: the real uid, which setpriv set).
WRITABLE_CHECK = (
    "import os, sys\n"
    "bad = [p for p in sys.argv[1:] if not os.access(p, os.W_OK)]\n"
    "print('\\n'.join(bad))\n"
    "sys.exit(1 if bad else 0)\n"
)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def lookup_user(name: str) -> User | None:
    """The passwd entry of ``name``, or None when there is none (entrypoint.py run outside the image)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def setpriv_argv(user: User) -> list[str]:
    """The prefix that runs a command as ``user`` with its groups (none when this process already is that user).
    Nothing else is dropped: newuidmap and newgidmap are setuid (or have file capabilities) and must keep working
    for the user."""
    if (user.uid, user.gid) == (os.geteuid(), os.getegid()):
        return []
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]


def state_dir(user: User, environ: Mapping[str, str]) -> str:
    """The state directory imgci uses as ``user``: IMGCI_STATE when set (the image sets it), else under its home."""
    return environ.get("IMGCI_STATE") or os.path.join(user.home, ".local", "share", "imgci")


def user_environ(user: User, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process run as ``user``: its HOME and name, the state directory pinned (so a changed HOME
    or XDG_DATA_HOME does not move it) and a PYTHONPATH that finds this imgci, however this process found it."""
    env = dict(environ)
    env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, IMGCI_STATE=state_dir(user, environ))
    root = str(Path(imgci.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH", "")) if p)
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_check(user: User, command: list[str]) -> subprocess.CompletedProcess[str] | str:
    """``command`` as ``user`` (secrets left out of its environment), or why it could not run."""
    environ = {k: v for k, v in os.environ.items() if k != "IMGCI_GITHUB_TOKEN"}
    try:
        return subprocess.run(
            [*setpriv_argv(user), *command],
            env=user_environ(user, environ),
            cwd="/",  # wherever this process is may be closed to the user
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
        )
    except FileNotFoundError:
        return "setpriv (util-linux) is not installed, so nothing can run as another user"
    except subprocess.TimeoutExpired:
        return f"the check did not finish in {CHECK_TIMEOUT:g} s"
    except OSError as e:
        return f"setpriv could not start: {e.strerror}"


def probe_userns(user: User) -> Check:
    """Can ``user`` run RUN steps in user namespaces with its subordinate id ranges? ``imgci doctor --isolation
    userns`` run as that user answers; a single-uid map does not count (apt and friends need other ids)."""
    done = _run_check(user, [sys.executable, "-m", "imgci", "doctor", "--format=json", "--isolation=userns"])
    if isinstance(done, str):
        return False, f"{USERNS_REFUSED} ({done})"
    try:
        report = json.loads(done.stdout)
    except ValueError:
        why = _last_line(done.stderr) or f"imgci doctor exited with status {done.returncode} and no report"
        return False, f"{USERNS_REFUSED} ({why})"
    choice, error = report.get("choice"), report.get("error")
    if not report.get("ok") or not choice or choice.get("isolation") != "userns":
        message = str((error or {}).get("message") or "imgci doctor found no user-namespace sandbox")
        return False, f"{USERNS_REFUSED} ({message.removeprefix('--isolation userns does not work here: ')})"
    if choice.get("idmap", {}).get("kind") != "subid":
        idmap: dict[str, Any] = next((row for row in report.get("probes", []) if row.get("name") == "idmap"), {})
        why = idmap.get("detail") or "no /etc/subuid and /etc/subgid ranges"
        return False, f"user namespaces work for {user.name} here, but not with its subordinate id ranges ({why})"
    return True, ""


def writable_paths(user: User, environ: Mapping[str, str] | None = None) -> list[str]:
    """What ``imgci run`` writes outside its temporary files: the working directory, the step's output and
    summary files, and the state directory (its nearest existing ancestor, when it is still to be made)."""
    environ = os.environ if environ is None else environ
    paths = [os.getcwd()]
    paths += [environ[key] for key in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY") if os.path.exists(environ.get(key, ""))]
    state = Path(state_dir(user, environ)).absolute()
    while not state.exists() and state != state.parent:
        state = state.parent
    return [*paths, str(state)]


def check_writable(user: User) -> Check:
    """May ``user`` write everything in :func:`writable_paths`? Checked by a process running as that user."""
    done = _run_check(user, [sys.executable, "-I", "-c", WRITABLE_CHECK, *writable_paths(user)])
    if isinstance(done, str):
        return False, f"nothing runs as {user.name} here: {done}"
    if done.returncode == 0:
        return True, ""
    bad = [line for line in done.stdout.splitlines() if line]
    if not bad:
        why = _last_line(done.stderr) or f"status {done.returncode}"
        return False, f"nothing runs as {user.name} here: {why}"
    return False, f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not writable by {user.name} (uid {user.uid})"


def choose_user(
    env: Mapping[str, str],
    probe: Callable[[User], Check] = probe_userns,
    writable: Callable[[User], Check] = check_writable,
    *,
    euid: int | None = None,
    lookup: Callable[[str], User | None] = lookup_user,
) -> tuple[str, str]:
    """Who runs ``imgci run``, and the line saying why: (:data:`CURRENT`, ""), (:data:`ROOT`, why) or (the
    unprivileged user's name, why). Raises :class:`RunAsError` when ``IMGCI_RUN_AS`` cannot be honoured.

    ``env`` gives IMGCI_RUN_AS (``root``, the user's name, or empty/``auto``: decide), IMGCI_USER (default
    ``imgci``) and the isolation input; ``probe`` and ``writable`` are asked only when the answer depends on them.
    """
    name = env.get("IMGCI_USER", "").strip() or DEFAULT_USER
    run_as = env.get("IMGCI_RUN_AS", "").strip()
    if run_as == "auto":
        run_as = ""
    if run_as not in ("", ROOT, name):
        raise RunAsError(f"IMGCI_RUN_AS must be root, {name} or auto (got {run_as!r})")
    euid = os.geteuid() if euid is None else euid
    user = lookup(name)
    if euid != 0:
        if run_as == ROOT:
            raise RunAsError(f"IMGCI_RUN_AS=root, but this process runs as uid {euid} and cannot become root")
        if run_as == name and (user is None or user.uid != euid):
            raise RunAsError(f"IMGCI_RUN_AS={name}, but this process runs as uid {euid} and cannot switch users")
        return CURRENT, ""
    if run_as == ROOT:
        return ROOT, "imgci: building as root (IMGCI_RUN_AS=root)"
    if user is None:
        if run_as:
            raise RunAsError(f"IMGCI_RUN_AS={name}, but there is no user {name} here (IMGCI_USER names the user)")
        return CURRENT, ""
    if user.uid == 0:  # IMGCI_USER names root itself: nothing to drop
        return CURRENT, ""
    isolation = read_input(env, "isolation")
    if isolation == "chroot":
        if run_as:
            raise RunAsError(f"IMGCI_RUN_AS={name}, but input isolation is chroot, which needs root")
        return ROOT, "imgci: building as root: input isolation is chroot, which needs root"
    ok, problem = probe(user)
    if ok:
        ok, problem = writable(user)
    if ok:
        return name, f"imgci: building as {name} (uid {user.uid}): user namespaces with subordinate ids work for it"
    if run_as:
        raise RunAsError(f"IMGCI_RUN_AS={name}, but {problem}")
    fallback = " (chroot when user namespaces are refused)" if isolation == "auto" else ""
    return ROOT, f"imgci: {problem}; building as root with --isolation {isolation}{fallback}"


def hand_over(path: Path, user: User) -> None:
    """Give ``path`` and everything under it to ``user`` (the private DOCKER_CONFIG: 0700, config.json 0600)."""
    os.chown(path, user.uid, user.gid)
    for parent, dirs, files in os.walk(path):
        for entry in [*dirs, *files]:
            os.chown(os.path.join(parent, entry), user.uid, user.gid, follow_symlinks=False)


def run_as(user: User, command: list[str], environ: Mapping[str, str]) -> int:
    """Run ``command`` as ``user`` in the current directory and return its exit status (128+N for signal N).

    SIGTERM, SIGINT and SIGHUP are passed on while it runs: as a container's PID 1 this process would otherwise
    ignore them, and a cancelled job would wait for SIGKILL. The command gets a session of its own, so that a
    terminal's Ctrl-C reaches it once (passed on), not twice."""
    proc = subprocess.Popen([*setpriv_argv(user), *command], env=dict(environ), start_new_session=True)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[forwarded] = signal.signal(forwarded, lambda n, _frame: proc.send_signal(n))
    try:
        status = proc.wait()
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
    return 128 - status if status < 0 else status


UserRunner = Callable[[User, list[str], Mapping[str, str]], int]


def main(
    env: Mapping[str, str] | None = None,
    argv_runner: ArgvRunner = imgci.cli.main,
    *,
    chooser: Callable[[Mapping[str, str]], tuple[str, str]] = choose_user,
    user_runner: UserRunner = run_as,
    lookup: Callable[[str], User | None] = lookup_user,
) -> int:
    """Run the action for the inputs in ``env`` (default ``os.environ``); returns the exit status.

    ``argv_runner`` runs imgci in this process (the login, and the run when it stays with this user);
    ``chooser`` decides who runs it (:func:`choose_user`); ``user_runner`` runs the ``python -m imgci run``
    command as the chosen user (:func:`run_as`)."""
    env = os.environ if env is None else env
    for name in SECRET_INPUTS:  # before anything else can print them
        mask(read_input(env, name))
    try:
        invocation = plan_invocation(env)
    except InputError as e:
        print(f"::error::{escape_command_data(str(e))}", flush=True)
        return 2
    for warning in invocation.warnings:
        print(f"::warning::{escape_command_data(warning)}", flush=True)

    with restored_process_state():
        try:
            os.chdir(invocation.working_directory)
        except OSError as e:
            message = f"input working-directory: cannot change to {invocation.working_directory!r}: {e.strerror}"
            print(f"::error::{escape_command_data(message)}", flush=True)
            return 2
        for name in SECRET_INPUTS:
            for key in input_env_keys(name):
                os.environ.pop(key, None)
        if invocation.token:
            os.environ["IMGCI_GITHUB_TOKEN"] = invocation.token
        with tempfile.TemporaryDirectory(prefix="imgci-docker-config-") as config_dir:
            os.chmod(config_dir, 0o700)  # mkdtemp's mode already; stated because the password is written here
            if invocation.login is not None:
                status = login(invocation, Path(config_dir), argv_runner)
                if status != 0:
                    return status
            try:
                who, why = chooser(env)
            except RunAsError as e:
                print(f"::error::{escape_command_data(str(e))}", flush=True)
                return 2
            if why:
                print(why, flush=True)
            print(f"imgci {shlex.join(invocation.run_argv)}", flush=True)
            if who in (CURRENT, ROOT):
                return call(argv_runner, invocation.run_argv)
            user = lookup(who)
            if user is None:  # the chooser named a user that is gone: stay, rather than fail the build
                return call(argv_runner, invocation.run_argv)
            # The login (if any) ran here, as root: carry the runner's logins over too, then hand the directory to
            # the user, who must read config.json (0600) and may log in again.
            use_private_docker_config(Path(config_dir))
            hand_over(Path(config_dir), user)
            command = [sys.executable, "-m", "imgci", *invocation.run_argv]
            return user_runner(user, command, user_environ(user, os.environ))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        # A command instead of the action: GitLab starts job containers with the image's ENTRYPOINT plus a shell
        # to run the script in, and `docker run IMAGE imgci version` should do what it says.
        os.execvp(sys.argv[1], sys.argv[1:])
    sys.exit(main())
