"""Sandbox escapes: a RUN sees its own root file system and nothing of the host, whatever it tries.

Each case is run in every isolation it applies to: ``userns``, ``chroot`` (root with mount permission: pivot_root
into a private mount namespace) and ``nomount`` (``chroot`` as root without CAP_SYS_ADMIN, the kaniko situation:
a plain chroot(2) and no mounts). Each test asserts a clear outcome — the build fails with an error naming the
Dockerfile line, or the RUN saw only its own root — and that nothing of the host escaped or changed: canary
files outside the build are untouched and no host data (canary contents, credentials) is in the built layers.

Lessons from the peers this suite replays:
- runc CVE-2024-21626: a descriptor of a host directory leaked into the container process, reachable as
  ``/proc/self/fd/N``, used as the working directory (``WORKDIR /proc/self/fd/N``).
- BuildKit CVE-2024-23651: cache mount sources and targets through symlinks.
- BuildKit CVE-2024-23652: the removal of mount point stubs deleting host files through a symlink the RUN
  swapped in for a stub's parent.
- The classic chroot(2) escape, and capabilities inherited by the builder (Docker's CVE-2022-24769).

What the integration tests already cover is not repeated here (``/proc/self/fd`` is listed again only with bind,
tmpfs and cache mounts in place): ``ls /proc/self/fd`` = 0,1,2,3 and no state dir, tmp path or host /tmp file
visible (tests/integration/test_run.py::test_run_environment_user_workdir_and_isolation),
Docker's default capabilities (…::test_run_gets_dockers_default_capabilities_only), secret values never in the
state dir or logs (tests/integration/test_run_mounts.py::test_secret_mounts_reach_the_command_and_nothing_else),
rw context bind writes never reaching the host (…::test_bind_mount_of_the_context_is_read_only_and_rw_writes_are_
discarded).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import Imgci
from tests.integration.test_build import _files
from tests.integration.test_run import NO_SYS_ADMIN, layer_blobs, no_sandbox_leftovers

MODES = ["userns", "chroot", "nomount"]


# -- helpers ----------------------------------------------------------------------------------------------------
def build(cli: Imgci, mode: str, ctx: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``imgci build`` of ``ctx`` in ``mode`` (``nomount``: chroot isolation as root without CAP_SYS_ADMIN)."""
    return build_many(cli, mode, [(ctx, list(args))])[0]


def build_many(cli: Imgci, mode: str, jobs: list[tuple[Path, list[str]]]) -> list[subprocess.CompletedProcess[str]]:
    """:func:`build` of each (context, args) in turn (not at once: on a small CI runner, parallel builds slow the
    sandbox probes down past their timeout)."""
    prefix = NO_SYS_ADMIN if mode == "nomount" else []
    isolation = "userns" if mode == "userns" else "chroot"
    done = []
    for ctx, args in jobs:
        argv = [sys.executable, "-m", "imgci", "build", "--progress", "plain", "--isolation", isolation, *args]
        run = subprocess.run([*prefix, *argv, str(ctx)], env=cli.environ(), capture_output=True, text=True, timeout=120)
        done.append(run)
    return done


def context(base: Path, name: str, dockerfile: str) -> Path:
    """A build context ``base/name``: the Dockerfile, ``sub/inner`` and symlinks that point out of it."""
    ctx = base / name
    (ctx / "sub").mkdir(parents=True)
    (ctx / "sub" / "inner").write_text("inner\n")
    (ctx / "Dockerfile").write_text(textwrap.dedent(dockerfile).lstrip())
    os.symlink("/", ctx / "link")
    os.symlink("../../..", ctx / "up")
    return ctx


def layer_bytes(cli: Imgci, name: str) -> bytes:
    """Every layer of image ``name``, decompressed, and its config: where host data must never be."""
    out = [cli.run("inspect", name, "--type", "config").stdout.encode()]
    for blob in layer_blobs(cli, name):
        data = blob.read_bytes()
        out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return b"\n".join(out)


def tree_snapshot(path: Path) -> dict[str, bytes | None]:
    """Every path under ``path`` (symlinks not followed) with a file's content: to show nothing changed."""
    snap: dict[str, bytes | None] = {}
    for p in sorted(path.rglob("*")):
        snap[str(p.relative_to(path))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return snap


def clear_failure(proc: subprocess.CompletedProcess[str], ctx: Path, line: int, *needles: str) -> None:
    """The build failed cleanly with an error naming ``Dockerfile:line`` and saying ``needles``."""
    assert proc.returncode == 1, f"expected a failed build, got {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and f"{ctx / 'Dockerfile'}:{line}:" in errors[-1], proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """Host canaries outside any build: a file with a random token, an empty directory and a victim tree."""
    canary = tmp_path / "host-canary.txt"
    canary.write_text(f"host-canary-{secrets.token_hex(12)}\n")
    empty = tmp_path / "host-empty-dir"
    empty.mkdir()
    victim = tmp_path / "host-victim"
    (victim / "b").mkdir(parents=True)
    (victim / "b" / "keep").write_text("keep me\n")
    (victim / "s").write_text("secret-target-victim\n")
    return {"canary": canary, "empty": empty, "victim": victim}


# -- 1. WORKDIR /proc/self/fd/N (runc CVE-2024-21626) -----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_workdir_through_proc_self_fd_never_reaches_a_host_directory(
    imgci: Imgci, busybox: str, tmp_path: Path, host: dict[str, Path], mode: str
) -> None:
    """Every descriptor the sandbox opened outside the root (bind sources: a host directory) is gone before the
    command's process changes into its working directory: ``/proc/self/fd/N`` is no way out."""
    (tmp_path / "secret").write_text("s\n")
    before = tree_snapshot(tmp_path)
    jobs = []
    fds = range(3, 10) if mode != "nomount" else (3, 4)  # no /proc without mount permission: any N is the same
    for n in fds:
        ctx = context(
            tmp_path / "ctx",
            f"fd{n}",
            f"""
            FROM {busybox}
            WORKDIR /proc/self/fd/{n}
            RUN --mount=type=bind,source=sub,target=/x --mount=type=tmpfs,target=/t \\
                --mount=type=cache,target=/c --mount=type=secret,id=s,target=/s \\
                pwd > /seen-pwd; ls -a .. > /seen-up; touch ../../escaped-{n} ../escaped-{n} escaped-{n}; true
            """,
        )
        jobs.append((ctx, ["--secret", f"id=s,src={tmp_path / 'secret'}", "-t", f"test/fd:{n}"]))
    for n, (ctx, _), proc in zip(fds, jobs, build_many(imgci, mode, jobs), strict=True):
        if proc.returncode == 0:  # nomount: no /proc, so /proc/self/fd/N is a plain directory of the image
            assert mode == "nomount", proc.stderr
            root = _files(imgci, f"test/fd:{n}", tmp_path / "unpacked")
            assert (root / "seen-pwd").read_text() == f"/proc/self/fd/{n}\n"
            assert (root / "seen-up").read_text().split() == [".", "..", str(n)]
        else:
            clear_failure(proc, ctx, 3, f"cannot change to the working directory /proc/self/fd/{n}")
    after = tree_snapshot(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    allowed = ("ctx/", "state", "docker", "unpacked")  # what the test itself made
    assert not [p for p in changed if not p.startswith(allowed)], sorted(changed)
    assert not [p for p in changed if "escaped" in p and not p.startswith(("state", "unpacked"))], sorted(changed)
    no_sandbox_leftovers(imgci)


# -- 2, 3, 5, 6. one build that tries every way out ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_run_sees_only_its_rootfs_and_none_of_the_builders_secrets(
    imgci: Imgci, busybox: str, tmp_path: Path, host: dict[str, Path], mode: str
) -> None:
    token = f"ghs_{secrets.token_hex(18)}"
    imgci_token = f"ghp_{secrets.token_hex(18)}"
    password = f"pw-{secrets.token_hex(12)}"
    auth = base64.b64encode(f"ci-user:{password}".encode()).decode()
    (imgci.docker_config / "config.json").write_text(json.dumps({"auths": {"registry.example": {"auth": auth}}}))
    imgci.env.update(GITHUB_TOKEN=token, IMGCI_GITHUB_TOKEN=imgci_token)
    state, canary = imgci.state, host["canary"]
    ctx = context(
        tmp_path,
        "ctx",
        f"""
        FROM {busybox}
        RUN --mount=type=bind,source=sub,target=/x --mount=type=tmpfs,target=/t --mount=type=cache,target=/c \\
            ls /proc/self/fd > /out-fds 2>&1; \\
            for n in $(seq 3 20); do (cd /proc/self/fd/$n 2>/dev/null && echo "$n $(pwd) $(ls -a)"); done \\
                > /out-fd-cd; true
        RUN --mount=type=bind,source=link,target=/x ls -A /x > /out-bind-link; \\
            cat /x/link{canary} >> /out-reach 2>&1; true
        RUN --mount=type=bind,source=up,target=/x,rw ls -A /x > /out-bind-up; touch /x/rw-write /x/up/rw-up; \\
            cat /x/up/host-canary.txt /x/up/../host-canary.txt >> /out-reach 2>/dev/null; true
        RUN --mount=type=cache,target=/c,id=../../escaped-cache echo 1 > /c/f
        RUN --mount=type=cache,target=/c,id={tmp_path}/escaped-cache-abs echo 2 > /c/f
        RUN --mount=type=cache,target=/c,id=../../../../../../../..{tmp_path}/escaped-cache-up echo 3 > /c/f
        RUN --mount=type=cache,target=/c,source=../../..,id=src echo 4 > /c/f
        RUN env > /out-env; cat /proc/1/environ > /out-environ 2>&1; cat /proc/[0-9]*/environ >> /out-environ 2>&1; \\
            cat /proc/[0-9]*/cmdline > /out-cmdline 2>&1; \\
            find / -path /proc -prune -o -path /sys -prune -o -name config.json -print > /out-find 2>&1; \\
            ls {state} {imgci.docker_config} > /out-ls-state 2>&1; \\
            cat {imgci.docker_config}/config.json /proc/1/root{imgci.docker_config}/config.json >> /out-reach 2>&1; true
        RUN for p in /proc/1/root /proc/self/root /proc/$PPID/root /proc/self/cwd /proc/1/cwd/..; do \\
                cat "$p{canary}"; ls "$p{tmp_path}"; done > /out-proc-reach 2>/dev/null; \\
            for d in /proc/[0-9]*; do cat "$d/root{canary}" "$d/cwd{canary}"; ls "$d/root{state}"; done \\
                >> /out-proc-reach 2>/dev/null; \\
            echo "$PPID" > /out-ppid; ls /proc > /out-proc-ls 2>&1; true
        """,
    )
    outside = tree_snapshot(tmp_path)
    proc = build(imgci, mode, ctx, "-t", "test/escape:1")
    assert proc.returncode == 0, proc.stderr
    root = _files(imgci, "test/escape:1", tmp_path / "unpacked")

    def out(name: str) -> str:
        return (root / f"out-{name}").read_text()

    # 1: no descriptor but the command's own (ls's directory) is open, and none leads anywhere
    if mode == "nomount":
        assert "No such file" in out("fds"), out("fds")  # no /proc at all without mount permission
    else:
        assert sorted(out("fds").split()) == ["0", "1", "2", "3"], out("fds")
    assert out("fd-cd") == "", out("fd-cd")
    # 2: bind sources are resolved inside the context: a symlink out of it (to / or ../../..) leads back into it
    listing = sorted(p.name for p in ctx.iterdir())
    for name in ("bind-link", "bind-up"):
        assert sorted(out(name).split()) == listing, (name, out(name))
    # 3: a cache id is a name, never a path: every cache is a hashed directory of STATE/cache/mounts
    caches = sorted(p.name for p in (state / "cache" / "mounts").iterdir())
    assert all(len(n.partition(".")[0]) == 32 for n in caches), caches
    seen = sorted(
        (state / "cache" / "mounts" / n / "f").read_text()
        for n in caches
        if (state / "cache" / "mounts" / n / "f").exists()
    )
    assert seen == ["1\n", "2\n", "3\n", "4\n"], seen
    # 5: nothing of the build process's environment, docker config or state dir is visible
    assert token not in out("env") and "GITHUB_TOKEN" not in out("env"), out("env")
    assert out("find") == "", out("find")
    assert out("ls-state").count("No such file") == 2, out("ls-state")
    # 6: no /proc link reaches a host file (the sandbox is pid 1 of its own namespace, its parent invisible)
    assert out("proc-reach") == "", out("proc-reach")
    if mode != "nomount":
        assert out("ppid") == "0\n" and out("proc-ls").split()[0] == "1", out("proc-ls")
    assert "No such file" in out("reach") or out("reach") == "", out("reach")

    data = layer_bytes(imgci, "test/escape:1")
    for leaked in (token, imgci_token, password, auth, canary.read_text().strip()):
        assert leaked.encode() not in data, f"{leaked!r} is in the image"
    shadow = Path("/etc/shadow").read_bytes() if Path("/etc/shadow").exists() else b""
    assert not shadow or shadow not in data
    after = tree_snapshot(tmp_path)
    changed = sorted(p for p in set(outside) | set(after) if outside.get(p) != after.get(p))
    assert not [p for p in changed if not p.startswith(("state", "unpacked"))], changed
    assert not list(tmp_path.rglob("escaped-cache*")) and not list(state.rglob("escaped-cache*"))

    # `..` in a bind source: refused (it leads out of the context), or kept inside it (BuildKit cleans the path)
    sources = ["../..", "/../../sub/..", "sub/../../..", "link/..", "up/../sub"]
    jobs = []
    for n, source in enumerate(sources):
        dockerfile = f"FROM {busybox}\nRUN --mount=type=bind,source={source},target=/x ls -A /x > /seen\n"
        jobs.append((context(tmp_path / "dotdot", str(n), dockerfile), ["-t", f"test/dotdot:{n}"]))
    for n, ((ctx, _), proc) in enumerate(zip(jobs, build_many(imgci, mode, jobs), strict=True)):
        if proc.returncode == 0:
            seen = (_files(imgci, f"test/dotdot:{n}", tmp_path / "unpacked") / "seen").read_text().split()
            assert seen in (sorted(p.name for p in ctx.iterdir()), ["inner"]), (sources[n], seen)
        else:
            clear_failure(proc, ctx, 2, "RUN --mount=type=bind failed", "outside the build context")
    after = tree_snapshot(tmp_path)
    changed = sorted(p for p in set(outside) | set(after) if outside.get(p) != after.get(p))
    assert not [p for p in changed if not p.startswith(("state", "unpacked", "dotdot/"))], changed
    no_sandbox_leftovers(imgci)


# -- 3, 4. mount targets through symlinks to host paths; stub cleanup (BuildKit CVE-2024-23651, CVE-2024-23652) -----
@pytest.mark.parametrize("mode", MODES)
def test_mount_targets_through_symlinks_stay_in_the_rootfs_and_cleanup_deletes_nothing_outside(
    imgci: Imgci, busybox: str, tmp_path: Path, host: dict[str, Path], mode: str
) -> None:
    empty, victim = host["empty"], host["victim"]
    (tmp_path / "secret").write_text("secret-value\n")
    secret_arg = ("--secret", f"id=s,src={tmp_path / 'secret'}")
    base = f"""
        FROM {busybox}
        RUN ln -s {empty} /target && ln -s {empty} /ptarget && ln -s {victim} /vtarget
    """
    ok = f"""
        RUN --mount=type=tmpfs,target=/ptarget/t touch /ptarget/t/in-tmpfs && readlink /ptarget > /seen-link
        RUN --mount=type=bind,source=sub,target=/ptarget/b ls /ptarget/b > /seen-bind
        RUN --mount=type=cache,target=/ptarget/c,id=sym touch /ptarget/c/in-cache
        RUN --mount=type=secret,id=s,target=/ptarget/s wc -c < /ptarget/s > /seen-secret
        RUN --mount=type=tmpfs,target=/a/b mv /a /a.old && ln -s {victim} /a
        RUN --mount=type=bind,source=sub,target=/a2/b mv /a2 /a2.old && ln -s {victim} /a2
        RUN --mount=type=cache,target=/a3/b,id=swap mv /a3 /a3.old && ln -s {victim} /a3
        RUN --mount=type=secret,id=s,target=/a4/s mv /a4 /a4.old && ln -s {victim} /a4
        RUN --mount=type=tmpfs,target=/vtarget/b true
    """
    before = tree_snapshot(tmp_path)
    ctx = context(tmp_path / "ctx", "ok", base + ok)
    proc = build(imgci, mode, ctx, *secret_arg, "-t", "test/targets:1")
    assert proc.returncode == 0, proc.stderr
    root = _files(imgci, "test/targets:1", tmp_path / "unpacked")
    assert (root / "seen-link").read_text() == f"{empty}\n"
    assert (root / "seen-bind").read_text() == "inner\n"
    assert (root / "seen-secret").read_text().strip() == "13"
    # the mounts landed in the rootfs's own copy of the host path, and their stubs are gone again
    assert not (root / str(empty).lstrip("/")).exists()
    assert [p.name for p in (imgci.state / "cache" / "mounts").glob("*/in-cache")] == ["in-cache"]
    # the steps that swapped a symlink to the host in for a mount point's parent: cleanup deleted nothing there
    assert (victim / "b" / "keep").read_text() == "keep me\n" and sorted(os.listdir(victim)) == ["b", "s"]
    assert (root / "a").is_symlink() and (root / "a.old").is_dir()

    # a mount point that is itself a symlink to a host path: refused, or mounted inside the rootfs
    lines = [
        "RUN --mount=type=tmpfs,target=/target touch /target/x",
        "RUN --mount=type=bind,source=sub,target=/target true",
        "RUN --mount=type=bind,source=sub/inner,target=/target true",
        "RUN --mount=type=cache,target=/target touch /target/x",
        "RUN --mount=type=secret,id=s,target=/target true",
        f"RUN --mount=type=bind,source=link{empty},target=/x true",
    ]
    jobs = [
        (context(tmp_path / "ctx", f"refused{n}", base + line + "\n"), [*secret_arg]) for n, line in enumerate(lines)
    ]
    for line, (ctx, _), proc in zip(lines, jobs, build_many(imgci, mode, jobs), strict=True):
        if proc.returncode != 0:
            clear_failure(proc, ctx, 3)
            assert "symbolic link" in proc.stderr or "not found in build context" in proc.stderr, (line, proc.stderr)
    assert sorted(os.listdir(empty)) == []
    after = tree_snapshot(tmp_path)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not [p for p in changed if not p.startswith(("ctx/", "state", "unpacked"))], changed
    assert (victim / "b" / "keep").read_text() == "keep me\n"
    no_sandbox_leftovers(imgci)


# -- 6. a chroot(2) jail is not a way out (nomount) -------------------------------------------------------------------
CHROOT_ESCAPE_C = r"""
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    mkdir("/.jail", 0700);
    if (chroot("/.jail") != 0) { perror("chroot"); return 3; }
    for (int i = 0; i < 64; i++) chdir("..");
    if (chroot(".") != 0) { perror("chroot ."); return 4; }
    execv(argv[1], argv + 1);
    perror("exec");
    return 5;
}
"""


@pytest.mark.parametrize("mode", MODES)
def test_run_cannot_break_out_of_its_root_with_chroot(
    imgci: Imgci, busybox: str, tmp_path: Path, host: dict[str, Path], mode: str
) -> None:
    """The classic escape — chroot into a subdirectory, climb out with ``..``, chroot there — works wherever the
    root is only a chroot(2) and the command keeps CAP_SYS_CHROOT: it must find nothing of the host."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the static escape program")
    ctx = context(tmp_path, "ctx", f"FROM {busybox}\nCOPY escape /escape\nRUN /escape /bin/cat {host['canary']}\n")
    (tmp_path / "escape.c").write_text(CHROOT_ESCAPE_C)
    cc = subprocess.run(["cc", "-static", "-O2", "-o", str(ctx / "escape"), str(tmp_path / "escape.c")])
    if cc.returncode != 0:
        pytest.skip("cannot link a static program here")
    proc = build(imgci, mode, ctx, "-t", "test/chroot-escape:1")
    assert host["canary"].read_text().strip() not in proc.stderr, proc.stderr
    clear_failure(proc, ctx, 3, "RUN failed with exit code")


# -- capabilities the builder inherited ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["userns", "chroot"])
def test_capabilities_inheritable_by_the_builder_do_not_reach_run(
    imgci: Imgci, busybox: str, tmp_path: Path, mode: str
) -> None:
    """A builder started with inheritable capabilities (Docker before 20.10.14 gave every container process its
    whole set as inheritable, CVE-2022-24769) must not pass them on: root's exec keeps its inheritable set
    whatever the bounding set says, so CAP_SYS_ADMIN there would let RUN mount the host's disks."""
    ctx = context(
        tmp_path,
        "ctx",
        f"""
        FROM {busybox}
        RUN grep -E '^Cap(Inh|Eff|Amb)' /proc/self/status > /caps; \\
            if mount -t tmpfs none /mnt 2>/dev/null; then exit 9; fi
        """,
    )
    probe = subprocess.run(["setpriv", "--inh-caps=+sys_admin,+sys_ptrace", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot raise inheritable capabilities here")
    argv = [sys.executable, "-m", "imgci", "build", "--isolation", mode, "-t", "test/inh:1", str(ctx)]
    proc = subprocess.run(
        ["setpriv", "--inh-caps=+sys_admin,+sys_ptrace", "--", *argv],
        env=imgci.environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    caps = (_files(imgci, "test/inh:1", tmp_path) / "caps").read_text().split()
    assert caps == ["CapInh:", "0000000000000000", "CapEff:", "00000000a80425fb", "CapAmb:", "0000000000000000"]
