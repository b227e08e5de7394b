"""``RUN --mount`` through ``imgci build``: cache, tmpfs, bind (context, stage, image), secret and ssh.

What the command saw is written into the image by the RUN itself and read back with ``imgci unpack``; what must
not be kept (mount contents, secret values) is searched for in the layers and everywhere in the state dir.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Imgci
from tests.integration.test_build import _context, _files
from tests.integration.test_run import layer_blobs, layer_members, no_sandbox_leftovers


def run_layer_names(cli: Imgci, name: str) -> set[str]:
    """Every path in the image's layers above the base."""
    return {n for blob in layer_blobs(cli, name)[1:] for n in layer_members(blob)}


def imgci_in(cli: Imgci, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``imgci`` run from ``cwd`` (for relative paths, as users type ``imgci build .``)."""
    return subprocess.run(
        [sys.executable, "-m", "imgci", *args], cwd=cwd, env=cli.environ(), capture_output=True, text=True, timeout=120
    )


# -- cache -----------------------------------------------------------------------------------------------------------
def test_cache_mount_persists_between_builds_shares_ids_and_applies_owner(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = _context(
        tmp_path / "one",
        f"""
        FROM {busybox}
        RUN --mount=type=cache,target=/cache echo first-build > /cache/f && echo one > /one
        RUN --mount=type=cache,id=shared,target=/a echo via-a > /a/shared-file
        RUN --mount=type=cache,target=/owned,uid=1000,gid=1001,mode=0750 stat -c '%u %g %a' /owned > /owned-stat \\
            && touch /owned/x
        """,
    )
    imgci.run("build", "-t", "test/cache:1", str(first))
    second = _context(
        tmp_path / "two",
        f"""
        FROM {busybox}
        RUN --mount=type=cache,target=/cache cat /cache/f > /seen-cache
        RUN --mount=type=cache,id=shared,target=/b cat /b/shared-file > /seen-shared
        RUN --mount=type=cache,target=/owned,uid=1000,gid=1001,mode=0750 stat -c '%u %g %a' /owned > /owned-stat \\
            && ls /owned > /owned-ls
        RUN --mount=type=cache,target=/fresh ls -A /fresh > /fresh-ls
        """,
    )
    imgci.run("build", "-t", "test/cache:2", str(second))
    one = _files(imgci, "test/cache:1", tmp_path)
    two = _files(imgci, "test/cache:2", tmp_path)
    assert (one / "owned-stat").read_text() == "1000 1001 750\n"
    assert (two / "seen-cache").read_text() == "first-build\n"
    assert (two / "seen-shared").read_text() == "via-a\n"
    assert (two / "owned-stat").read_text() == "1000 1001 750\n" and (two / "owned-ls").read_text() == "x\n"
    assert (two / "fresh-ls").read_text() == ""
    for name in ("test/cache:1", "test/cache:2"):
        names = run_layer_names(imgci, name)
        assert not names & {"cache", "cache/f", "a", "b", "a/shared-file", "owned", "owned/x", "fresh"}, names
    no_sandbox_leftovers(imgci)


def test_cache_mount_sharing_locked_serialises_concurrent_builds(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox}
        ARG WHO
        RUN --mount=type=cache,id=locked,target=/c,sharing=locked \\
            if [ -e /c/busy ]; then echo "overlap: $(cat /c/busy) holds the cache"; exit 1; fi; \\
            echo $WHO > /c/busy; sleep 1.5; rm /c/busy; echo $WHO >> /c/order
        RUN --mount=type=cache,id=locked,target=/c,sharing=locked cat /c/order > /order
        """,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "imgci", "build", "--build-arg", f"WHO={who}", "-t", f"test/locked:{who}", str(ctx)],
            env=imgci.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    orders = [(_files(imgci, f"test/locked:{w}", tmp_path) / "order").read_text().split() for w in ("a", "b")]
    assert sorted(max(orders, key=len)) == ["a", "b"], orders


# -- tmpfs and bind ----------------------------------------------------------------------------------------------------
def test_tmpfs_and_bind_mounts_of_a_stage_and_an_image(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS builder
        RUN mkdir /out && echo built > /out/artifact

        FROM {busybox}
        RUN echo changed-here >> /etc/group
        RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t && cat /scratch/t > /tmpfs-seen \\
            && grep ' /scratch tmpfs ' /proc/mounts > /tmpfs-mount
        RUN --mount=type=bind,from=builder,source=/out,target=/in cat /in/artifact > /stage-seen \\
            && if touch /in/new 2>/dev/null; then echo writable; else echo read-only; fi > /stage-ro
        RUN --mount=type=bind,from=builder,source=/out,target=/in,rw echo scribble > /in/artifact \\
            && cat /in/artifact > /stage-rw-seen
        RUN --mount=type=bind,from=builder,source=/out/artifact,target=/one-file cat /one-file > /stage-file-seen
        RUN --mount=type=bind,from={busybox},source=/etc/group,target=/image-group cat /image-group > /image-seen
        """,
    )
    imgci.run("build", "-t", "test/binds:1", str(ctx))
    root = _files(imgci, "test/binds:1", tmp_path)
    assert (root / "tmpfs-seen").read_text() == "t\n" and (root / "tmpfs-mount").read_text().strip()
    assert (root / "stage-seen").read_text() == "built\n" and (root / "stage-ro").read_text() == "read-only\n"
    assert (root / "stage-rw-seen").read_text() == "scribble\n"
    assert (root / "stage-file-seen").read_text() == "built\n"  # the rw write before was discarded
    image_group = (root / "image-seen").read_text()
    assert "nogroup" in image_group and "changed-here" not in image_group  # the image, not this stage
    names = run_layer_names(imgci, "test/binds:1")
    assert not names & {"scratch", "scratch/t", "in", "in/artifact", "in/new", "one-file", "image-group"}, names
    no_sandbox_leftovers(imgci)


BIND_CONTEXT_DOCKERFILE = """\
FROM localhost/busybox:latest
RUN --mount=type=bind,target=/ctx cat /ctx/data > /ctx-seen && ls /ctx > /ctx-ls \\
    && if touch /ctx/new 2>/dev/null; then echo writable; else echo read-only; fi > /ctx-ro
RUN --mount=type=bind,target=/ctx,rw echo w > /ctx/written && cat /ctx/written > /rw-seen && rm /ctx/data
RUN --mount=type=bind,source=sub,target=/sub cat /sub/inner > /sub-seen
"""


def _check_bind_context(imgci: Imgci, ctx: Path, name: str, out: Path) -> None:
    root = _files(imgci, name, out)
    assert (root / "ctx-seen").read_text() == "data\n"
    assert (root / "ctx-ls").read_text().split() == ["Dockerfile", "data", "sub"]
    assert (root / "ctx-ro").read_text() == "read-only\n"
    assert (root / "rw-seen").read_text() == "w\n"
    assert (root / "sub-seen").read_text() == "inner\n"
    assert sorted(p.name for p in ctx.iterdir()) == ["Dockerfile", "data", "sub"]  # rw writes never reach the host
    assert (ctx / "data").read_text() == "data\n"
    names = run_layer_names(imgci, name)
    assert not names & {"ctx", "ctx/written", "ctx/new", "sub", "sub/inner"}, names


def test_bind_mount_of_the_context_is_read_only_and_rw_writes_are_discarded(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, BIND_CONTEXT_DOCKERFILE, {"data": "data\n", "sub/inner": "inner\n"})
    imgci.run("build", "-t", "test/bind-ctx:1", str(ctx))
    _check_bind_context(imgci, ctx, "test/bind-ctx:1", tmp_path)
    no_sandbox_leftovers(imgci)


def test_bind_mount_of_a_context_given_as_a_relative_path(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    """``imgci build .``: the context is the current directory of imgci, not of the sandbox (which is ``/``)."""
    ctx = _context(tmp_path, BIND_CONTEXT_DOCKERFILE, {"data": "data\n", "sub/inner": "inner\n"})
    proc = imgci_in(imgci, ctx, "build", "-t", "test/bind-ctx:rel", ".")
    assert proc.returncode == 0, proc.stderr
    _check_bind_context(imgci, ctx, "test/bind-ctx:rel", tmp_path)
    proc = imgci_in(imgci, tmp_path, "build", "-t", "test/bind-ctx:rel2", "ctx")
    assert proc.returncode == 0, proc.stderr
    _check_bind_context(imgci, ctx, "test/bind-ctx:rel2", tmp_path / "rel2")


def test_bind_mount_of_the_context_honours_dockerignore(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    """The context a RUN binds is the context the build sees (BuildKit: the same filtered local source)."""
    files = {"keep": "k", "secret.env": "password", "logs/x.log": "l", ".dockerignore": "secret.env\nlogs\n"}
    ctx = _context(tmp_path, f"FROM {busybox}\nRUN --mount=type=bind,target=/ctx ls -A /ctx > /ctx-ls\n", files)
    imgci.run("build", "-t", "test/bind-ignore:1", str(ctx))
    listing = (_files(imgci, "test/bind-ignore:1", tmp_path) / "ctx-ls").read_text().split()
    assert listing == [".dockerignore", "Dockerfile", "keep"]


# -- secrets ---------------------------------------------------------------------------------------------------------
def _all_state_bytes(state: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file of the state dir, gzip blobs decompressed."""
    for p in sorted(state.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        yield p, data


def test_secret_mounts_reach_the_command_and_nothing_else(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    tok = f"tok-{secrets.token_hex(12)}\n".encode()  # a file as `echo value > file` writes it
    envtok = f"envtok-{secrets.token_hex(12)}".encode()
    (tmp_path / "tok").write_bytes(tok)
    imgci.env["HOST_TOKEN"] = envtok.decode()
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox}
        RUN --mount=type=secret,id=tok md5sum /run/secrets/tok | cut -d' ' -f1 > /tok-md5 \\
            && stat -c '%a %u %g' /run/secrets/tok > /tok-stat && cat /run/secrets/tok \\
            && base64 /run/secrets/tok && if echo x > /run/secrets/tok; then echo writable; fi
        RUN --mount=type=secret,id=tok,target=/etc/tok-file,mode=0440,uid=1000,gid=1001 \\
            stat -c '%a %u %g' /etc/tok-file > /custom-stat
        RUN --mount=type=secret,id=envtok,env=MY_TOKEN printf %s "$MY_TOKEN" | md5sum | cut -d' ' -f1 > /env-md5 \\
            && echo "token is $MY_TOKEN" && test ! -e /run/secrets/envtok && echo no-file > /env-no-file
        RUN --mount=type=secret,id=absent test ! -e /run/secrets/absent && echo skipped > /absent
        """,
    )
    meta = tmp_path / "meta.json"
    proc = imgci.run(
        "build",
        "--progress",
        "plain",
        "--secret",
        f"id=tok,src={tmp_path / 'tok'}",
        "--secret",
        "id=envtok,env=HOST_TOKEN",
        "--metadata-file",
        str(meta),
        "-t",
        "test/secrets:1",
        str(ctx),
    )
    root = _files(imgci, "test/secrets:1", tmp_path)
    assert (root / "tok-md5").read_text().strip() == hashlib.md5(tok).hexdigest()
    assert (root / "tok-stat").read_text() == "400 0 0\n"
    assert (root / "custom-stat").read_text() == "440 1000 1001\n"
    assert (root / "env-md5").read_text().strip() == hashlib.md5(envtok).hexdigest()
    assert (root / "env-no-file").read_text() == "no-file\n" and (root / "absent").read_text() == "skipped\n"
    assert "writable" not in proc.stderr
    layers = [sorted(layer_members(b)) for b in layer_blobs(imgci, "test/secrets:1")[1:]]
    expected = [["sys", "tok-md5", "tok-stat"], ["custom-stat"], ["env-md5", "env-no-file"], ["absent"]]
    assert layers == expected, layers  # (/sys: the mount point BuildKit leaves in the first RUN's layer)

    forms = {tok, tok.strip(), envtok}
    forms |= {f for s in list(forms) for f in (base64.b64encode(s), base64.b64encode(s).rstrip(b"="))}
    for path, data in _all_state_bytes(imgci.state):  # layers, config, history, cache keys, ...
        for form in forms:
            assert form not in data, f"secret {form!r} found in {path}"
    config = imgci.run("inspect", "test/secrets:1").stdout.encode()
    outputs = {"stdout": proc.stdout.encode(), "metadata": meta.read_bytes(), "config": config}
    outputs["stderr"] = proc.stderr.encode()  # the RUN printed both secrets, raw and base64: all redacted
    for where, data in outputs.items():
        for form in forms:
            assert form not in data, f"secret {form!r} found in {where}:\n{data.decode()}"
    assert "token is ****" in proc.stderr and proc.stderr.count("****") >= 3, proc.stderr
    no_sandbox_leftovers(imgci)


def test_required_secret_or_ssh_that_was_not_given_is_a_clear_error(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(tmp_path, f"FROM {busybox}\nRUN --mount=type=secret,id=absent,required=true true\n")
    err = imgci.fails("build", str(ctx))
    assert f"{ctx / 'Dockerfile'}:2:" in err and "absent" in err and "required" in err, err
    assert "--secret" in err, err  # the hint says how to pass it
    (ctx / "Dockerfile").write_text(f"FROM {busybox}\nRUN --mount=type=ssh,id=agent,required=true true\n")
    err = imgci.fails("build", str(ctx))
    assert f"{ctx / 'Dockerfile'}:2:" in err and "agent" in err and "required" in err, err
    no_sandbox_leftovers(imgci)


# -- ssh ---------------------------------------------------------------------------------------------------------------
def test_ssh_mount_forwards_the_agent_socket(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="imgci-ssh-"))
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        agent.bind(str(sockdir / "agent.sock"))
        agent.listen(4)
        ctx = _context(
            tmp_path,
            f"""
            FROM {busybox}
            RUN --mount=type=ssh test -S "$SSH_AUTH_SOCK" && echo "$SSH_AUTH_SOCK" > /ssh-sock
            RUN --mount=type=ssh,id=other,target=/agent.sock test -S /agent.sock && echo ok > /ssh-target \\
                && echo "[$SSH_AUTH_SOCK]" > /ssh-env
            """,
        )
        sock = str(sockdir / "agent.sock")
        imgci.run("build", "--ssh", f"default={sock}", "--ssh", f"other={sock}", "-t", "test/ssh:1", str(ctx))
    finally:
        agent.close()
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()
    root = _files(imgci, "test/ssh:1", tmp_path)
    assert (root / "ssh-sock").read_text() == "/run/buildkit/ssh_agent.0\n"
    assert (root / "ssh-target").read_text() == "ok\n"
    assert (root / "ssh-env").read_text() == "[/agent.sock]\n"
    names = run_layer_names(imgci, "test/ssh:1")
    assert not any(n.startswith(("run", "agent.sock")) for n in names), names
    no_sandbox_leftovers(imgci)
