"""RUN in the sandbox through ``imgci build``: what the command sees, what the layer keeps, failures, network,
the four isolation x snapshotter modes and chroot without mount permission.

Results are written into the image by the RUN steps themselves and read back with ``imgci unpack`` (as root:
real ownership) or straight from the layer blobs; one build checks as many things as it can.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Imgci
from tests.integration.test_build import _config, _context, _files

EPOCH = "1700000000"
NO_SYS_ADMIN = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"]  # root without mounts


# -- helpers ------------------------------------------------------------------------------------------------------
def layer_blobs(cli: Imgci, name: str) -> list[Path]:
    """The layer blob files of image ``name`` in ``cli``'s store, bottom first."""
    manifest = json.loads(cli.run("inspect", name, "--type", "manifest").stdout)
    return [cli.state / "blobs" / "sha256" / layer["digest"].split(":")[1] for layer in manifest["layers"]]


def layer_members(blob: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(blob) as t:
        return {m.name.rstrip("/"): m for m in t.getmembers()}


def history(cli: Imgci, name: str) -> list[str]:
    return [h.get("created_by", "") for h in _config(cli, name)["history"]]


def no_sandbox_leftovers(cli: Imgci, marker: str = "") -> None:
    """No ``run-*`` work directory, no mount under the state dir, and (``marker``) no process left behind."""
    work_dirs = sorted((cli.state / "tmp").glob("run-*"))
    assert not work_dirs, work_dirs
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(cli.state) not in mounts, [ln for ln in mounts.splitlines() if str(cli.state) in ln]
    if marker:
        found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
        assert found.returncode == 1, f"left behind: {found.stdout}"


# -- 1. what the command sees ---------------------------------------------------------------------------------------
def test_run_environment_user_workdir_and_isolation(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    fd, name = tempfile.mkstemp(prefix="host-tmp-file-", dir=tempfile.gettempdir())
    os.close(fd)
    canary = Path(name)
    try:
        _check_run_basics(imgci, busybox, tmp_path, canary)
    finally:
        canary.unlink()


def _check_run_basics(imgci: Imgci, busybox: str, tmp_path: Path, canary: Path) -> None:
    passwd = (
        "echo app:x:1000:1000:app:/home/app:/bin/sh >> /etc/passwd"
        " && echo app:x:1000: >> /etc/group && echo extra:x:2000:app >> /etc/group"
        " && echo more:x:2001:root,app >> /etc/group && echo other:x:2002:root >> /etc/group"
    )
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS base
        ARG V=1
        ARG UNSET
        ENV E=env-value
        RUN echo "shell $V $E" > /shell-form
        RUN ["/bin/sh", "-c", "echo exec $V $E > /exec-form"]
        RUN ["/bin/busybox", "touch", "/exec-no-shell"]
        RUN <<EOF
        echo heredoc-one > /heredoc
        echo "heredoc $V $E" >> /heredoc
        EOF
        RUN <<EOF
        #!/bin/sh
        echo "script $V" > /script
        test "$0" != sh && echo not-sh-c >> /script
        EOF
        RUN hostname > /hostname && cat /etc/hosts > /hosts-seen && test -f /etc/resolv.conf \\
            && cp /etc/resolv.conf /resolv-seen && ls /proc/self/fd > /fds && env > /env && umask > /umask \\
            && echo /proc/[0-9]* > /pids \\
            && touch /umask-file && mkdir /umask-dir
        RUN test ! -e {imgci.state} && test ! -e {tmp_path} && test ! -e {canary} && test ! -e {REPO}/imgci \\
            && test ! -e /tmp/{canary.name} && echo isolated > /isolated
        RUN {passwd} && mkdir /out && chmod 1777 /out
        USER app
        RUN id > /out/id-app && touch /out/by-app && mkdir /out/dir-by-app && echo "$HOME" > /out/home-app
        USER 1234
        RUN id > /out/id-1234 && touch /out/by-1234 && echo "$HOME" > /out/home-1234
        USER app:extra
        RUN id > /out/id-app-extra && touch /out/by-app-extra
        USER root
        SHELL ["/bin/env", "VIA_SHELL=yes", "/bin/sh", "-c"]
        RUN echo "shell=$VIA_SHELL" > /shell-instruction
        WORKDIR /work/dir
        RUN pwd > /pwd && echo rel > relfile
        WORKDIR /gone
        RUN rmdir /gone

        FROM base
        RUN pwd > /pwd-missing && echo here > inside-gone
        """,
    )
    imgci.env.update(
        HOME="/host-home-canary",
        REGISTRY_PASSWORD="hunter2-canary",
        AWS_SECRET_ACCESS_KEY="aws-canary",
        IMGCI_LEAK_CANARY="imgci-canary",
    )
    imgci.run("build", "--build-arg", "V=1", "-t", "test/run-basics:1", str(ctx))
    root = _files(imgci, "test/run-basics:1", tmp_path)

    assert (root / "shell-form").read_text() == "shell 1 env-value\n"
    assert (root / "exec-form").read_text() == "exec 1 env-value\n"
    assert (root / "exec-no-shell").is_file()
    assert (root / "heredoc").read_text() == "heredoc-one\nheredoc 1 env-value\n"
    assert (root / "script").read_text() == "script 1\nnot-sh-c\n"
    assert (root / "hostname").read_text() == "buildkitsandbox\n"
    hosts = (root / "hosts-seen").read_text()
    assert "localhost" in hosts and "buildkitsandbox" in hosts
    assert (root / "resolv-seen").is_file()
    # the builder's hosts/resolv.conf are not in the image (busybox has none); the mount point /sys stays, empty,
    # as BuildKit leaves it
    assert not (root / "etc" / "hosts").exists() and not (root / "etc" / "resolv.conf").exists()
    assert os.listdir(root / "sys") == [] and os.listdir(root / "proc") == [] and os.listdir(root / "dev") == []
    assert sorted((root / "fds").read_text().split()) == ["0", "1", "2", "3"]  # 3: ls's own directory
    assert (root / "pids").read_text() == "/proc/1\n"  # its own pid namespace: no host process is visible
    env = dict(line.partition("=")[::2] for line in (root / "env").read_text().splitlines())
    assert env.pop("PATH") == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env.pop("HOME") == "/root"
    assert env.pop("E") == "env-value" and env.pop("V") == "1"
    assert set(env) <= {"PWD", "SHLVL", "_"}, env  # only what the shell itself adds: not UNSET (an ARG without value)
    assert (root / "umask").read_text().strip() in ("0022", "022")
    assert (root / "umask-file").stat().st_mode & 0o777 == 0o644
    assert (root / "umask-dir").stat().st_mode & 0o777 == 0o755
    assert (root / "isolated").read_text() == "isolated\n"

    def ids(name: str) -> tuple[str, str, set[str]]:
        text = (root / "out" / name).read_text()
        m = re.fullmatch(r"uid=(\S+) gid=(\S+)(?: groups=(\S+))?\n", text)
        assert m, text
        return m.group(1), m.group(2), set((m.group(3) or "").split(",")) - {""}

    # no supplementary groups from /etc/group, as BuildKit's RUN (the primary group at most)
    assert ids("id-app")[:2] == ("1000(app)", "1000(app)") and ids("id-app")[2] <= {"1000(app)"}
    assert ids("id-1234")[:2] == ("1234", "0(root)") and ids("id-1234")[2] <= {"0(root)"}
    assert ids("id-app-extra")[:2] == ("1000(app)", "2000(extra)") and ids("id-app-extra")[2] <= {"2000(extra)"}
    assert (root / "out" / "home-app").read_text() == "/home/app\n"
    assert (root / "out" / "home-1234").read_text() == "/\n"

    def owner(rel: str) -> tuple[int, int, int]:
        st = (root / rel).lstat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    assert owner("out/by-app") == (1000, 1000, 0o644)
    assert owner("out/dir-by-app") == (1000, 1000, 0o755)
    assert owner("out/by-1234") == (1234, 0, 0o644)
    assert owner("out/by-app-extra") == (1000, 2000, 0o644)
    assert (root / "shell-instruction").read_text() == "shell=yes\n"
    assert (root / "pwd").read_text() == "/work/dir\n"
    assert (root / "work" / "dir" / "relfile").read_text() == "rel\n"
    assert (root / "pwd-missing").read_text() == "/gone\n"
    assert (root / "gone" / "inside-gone").read_text() == "here\n"

    created_by = history(imgci, "test/run-basics:1")
    assert 'RUN |2 V=1 UNSET= /bin/sh -c echo "shell $V $E" > /shell-form # buildkit' in created_by
    assert "RUN |2 V=1 UNSET= /bin/sh -c echo exec $V $E > /exec-form # buildkit" in created_by
    assert "RUN |2 V=1 UNSET= /bin/busybox touch /exec-no-shell # buildkit" in created_by
    via_shell = 'RUN |2 V=1 UNSET= /bin/env VIA_SHELL=yes /bin/sh -c echo "shell=$VIA_SHELL" > /shell-instruction'
    assert f"{via_shell} # buildkit" in created_by
    assert any("heredoc-one" in c for c in created_by), created_by
    config_text = imgci.run("inspect", "test/run-basics:1", "--type", "config").stdout
    for leaked in ("hunter2-canary", "aws-canary", "imgci-canary", "host-home-canary"):
        assert leaked not in config_text
    # /etc/hosts and the contents of /proc, /dev and /sys never reached a layer; /sys came with the first RUN
    blobs = layer_blobs(imgci, "test/run-basics:1")
    assert sorted(layer_members(blobs[1])) == ["shell-form", "sys"]
    for blob in blobs[1:]:
        names = layer_members(blob)
        assert "etc/hosts" not in names and "etc/resolv.conf" not in names and "proc" not in names, sorted(names)
        assert not any(n.startswith(("dev", "sys/", "proc/")) for n in names), sorted(names)


# -- 2. the four isolation x snapshotter modes give the same bytes ------------------------------------------------
MODES = [("userns", "overlay"), ("userns", "native"), ("chroot", "overlay"), ("chroot", "native")]
MODES_DOCKERFILE = """\
FROM localhost/busybox:latest
RUN mkdir -p /d/sub /o/keep /rmdir/deep && echo a > /d/f && echo b > /d/sub/g && echo c > /o/keep/x \\
 && echo del > /rmfile && echo h > /h1 && echo m > /modeonly && echo o > /ownonly && ln -s /d/f /oldlink \\
 && echo q > /rmdir/deep/q && echo s > /suid && echo t > /d/untouched
RUN rm /rmfile && rm -r /rmdir && rm -r /o && mkdir -p /o/new && echo n > /o/new/n \\
 && ln /h1 /h2 && echo n1 > /n1 && ln /n1 /n2 && chmod 600 /modeonly && chown 65534:65534 /ownonly \\
 && chmod 4755 /suid && rm /oldlink && ln -s /elsewhere /oldlink && ln -s ../f /d/sub/rel \\
 && echo changed > /d/sub/g && mkdir /sg && chmod 2775 /sg && chmod 1777 /d
"""


class ModeBuild:
    def __init__(self, cli: Imgci, digest: str, stderr: str) -> None:
        self.cli = cli
        self.digest = digest
        self.stderr = stderr
        self.blobs = layer_blobs(cli, "test/modes:1")
        self.layers = [layer_members(b) for b in self.blobs]

    def listing(self) -> list[str]:
        return [
            f"{n} type={m.type.decode()} mode={m.mode:o} owner={m.uid}:{m.gid} link={m.linkname} mtime={m.mtime}"
            for layer in self.layers[1:]
            for n, m in layer.items()
        ] + ["--"]


@pytest.fixture(scope="module")
def mode_build(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Callable[[str, str], ModeBuild]:
    """The same Dockerfile built once per mode (each in its own state dir), on first request."""
    base = tmp_path_factory.mktemp("modes")
    (base / "docker").mkdir()
    ctx = base / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MODES_DOCKERFILE)
    built: dict[tuple[str, str], ModeBuild] = {}

    def get(isolation: str, backend: str) -> ModeBuild:
        if (isolation, backend) not in built:
            cli = Imgci(state=base / f"state-{isolation}-{backend}", docker_config=base / "docker")
            cli.env["SOURCE_DATE_EPOCH"] = EPOCH
            cli.run("import", str(busybox_tar), "localhost/busybox:latest")
            iid = base / f"iid-{isolation}-{backend}"
            args = ["--isolation", isolation, "-b", backend, "--progress", "plain", "--iidfile", str(iid)]
            proc = cli.run("build", *args, "-t", "test/modes:1", str(ctx))
            built[isolation, backend] = ModeBuild(cli, iid.read_text(), proc.stderr)
        return built[isolation, backend]

    return get


@pytest.mark.parametrize(("isolation", "backend"), MODES)
def test_run_layer_changes_in_each_mode(
    mode_build: Callable[[str, str], ModeBuild], isolation: str, backend: str
) -> None:
    b = mode_build(isolation, backend)
    assert f"sandbox: {isolation}:" in b.stderr and f"sandbox: {backend}:" in b.stderr, b.stderr
    assert len(b.layers) == 3
    layer = b.layers[2]
    listing = "\n".join(b.listing())
    # deleted lower file and directory: one whiteout each, nothing below the deleted directory
    assert ".wh.rmfile" in layer and ".wh.rmdir" in layer, listing
    assert not any(n.startswith("rmdir/") for n in layer), listing
    for wh in (".wh.rmfile", ".wh.rmdir"):
        assert layer[wh].isreg() and layer[wh].size == 0
    # /o removed and re-created: the old contents stay hidden (an opaque marker or a whiteout per old child)
    assert layer["o"].isdir() and layer["o/new/n"].isreg(), listing
    assert "o/.wh..wh..opq" in layer or "o/.wh.keep" in layer, listing
    assert not any(n.startswith("o/keep/") for n in layer), listing
    # hardlinks: a pair made in this step is one file and one link to it; a link to a lower file never
    # points outside the layer
    assert layer["n1"].isreg() and layer["n2"].islnk() and layer["n2"].linkname == "n1", listing
    assert layer["h2"].isreg() or (layer["h2"].islnk() and layer["h2"].linkname in layer), listing
    # metadata-only changes carry the new metadata; unchanged files of a changed directory are not repeated
    assert layer["modeonly"].mode == 0o600 and layer["ownonly"].uid == 65534 and layer["ownonly"].gid == 65534
    assert layer["suid"].mode == 0o4755 and layer["sg"].mode == 0o2775 and layer["d"].mode == 0o1777
    assert layer["oldlink"].issym() and layer["oldlink"].linkname == "/elsewhere"
    assert layer["d/sub/rel"].issym() and layer["d/sub/rel"].linkname == "../f"
    assert "d/f" not in layer and "d/untouched" not in layer, listing
    assert all(m.mtime <= int(EPOCH) for m in layer.values()), listing
    with tarfile.open(b.blobs[2]) as t:
        assert t.extractfile("d/sub/g").read() == b"changed\n"  # type: ignore[union-attr]


def test_run_layers_are_byte_identical_across_modes(mode_build: Callable[[str, str], ModeBuild]) -> None:
    builds = {mode: mode_build(*mode) for mode in MODES}
    reference = builds[MODES[0]]
    for mode, b in builds.items():
        if b.digest != reference.digest:
            diff = "\n".join(
                difflib.unified_diff(reference.listing(), b.listing(), str(MODES[0]), str(mode), lineterm="")
            )
            pytest.fail(f"{mode} built {b.digest}, {MODES[0]} built {reference.digest}; layer listings:\n{diff}")


def test_chmod_and_chown_to_the_same_values_are_no_change_in_either_snapshotter(
    imgci_factory: Callable[[], Imgci], busybox_tar: Path, tmp_path: Path
) -> None:
    """``chmod``/``chown`` that set what is already there change nothing, for a file of the base image and one of
    an earlier RUN alike: no entry with either snapshotter (BuildKit's differ compares mode, owner, size, mtime and
    content, never ctime), so the two snapshotters give the same layer."""
    ctx = _context(
        tmp_path,
        """
        FROM localhost/busybox:latest
        RUN echo mine > /mine && chmod 640 /mine
        RUN chmod 640 /mine && chown 0:0 /mine /etc/passwd && chmod 644 /etc/passwd && echo marker > /marker
        """,
    )
    listings = {}
    for backend in ("overlay", "native"):
        cli = imgci_factory()
        cli.env["SOURCE_DATE_EPOCH"] = EPOCH
        cli.run("import", str(busybox_tar), "localhost/busybox:latest")
        cli.run("build", "--isolation", "userns", "-b", backend, "-t", "test/same:1", str(ctx))
        listings[backend] = sorted(layer_members(layer_blobs(cli, "test/same:1")[2]))
    assert listings == {"overlay": ["marker"], "native": ["marker"]}


# -- 3. failures ---------------------------------------------------------------------------------------------------
def test_failed_run_names_line_command_exit_code_and_last_output_lines(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    marker = f"sleep {900000 + os.getpid() % 90000}"  # unique to this test run, for pgrep
    failing = f'i=1; while [ $i -le 30 ]; do echo "out-$i-end"; i=$((i+1)); done; {marker} & exit 3'
    ctx = _context(tmp_path, f"FROM {busybox}\nRUN echo first > /first\nRUN {failing}\n")
    imgci.env["SOURCE_DATE_EPOCH"] = EPOCH  # the first RUN gives the same layer each time
    err = imgci.fails("build", "--progress", "plain", str(ctx))
    message = err[err.index("error: ") :]
    assert f"{ctx / 'Dockerfile'}:3:" in message, message
    assert "exit code 3" in message and failing in message, message
    shown = re.findall(r"out-(\d+)-end", message)
    assert shown == [str(n) for n in range(11, 31)], message  # the last 20 lines, in order
    no_sandbox_leftovers(imgci, marker)

    snapshots = imgci.state / "snapshots" / "user"
    base_diff_id = _config(imgci, busybox)["rootfs"]["diff_ids"][0].split(":")[1]
    before = {p.name: p.stat().st_ino for p in snapshots.iterdir()}
    assert base_diff_id in before and len(before) == 2, before  # the base and the first RUN's layer

    (ctx / "Dockerfile").write_text(f"FROM {busybox}\nRUN echo first > /first\nRUN echo fixed > /fixed\n")
    imgci.run("build", "-t", "test/fixed:1", str(ctx))
    after = {p.name: p.stat().st_ino for p in snapshots.iterdir()}
    assert {k: after[k] for k in before} == before  # the base and first layer's snapshots were reused as they are
    assert len(after) == 3, after  # only the new layer was added
    root = _files(imgci, "test/fixed:1", tmp_path)
    assert (root / "first").read_text() == "first\n" and (root / "fixed").read_text() == "fixed\n"
    no_sandbox_leftovers(imgci)


def test_a_failing_stage_cancels_a_running_one(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    marker = f"sleep {800000 + os.getpid() % 90000}"
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox} AS slow
        RUN {marker}
        FROM {busybox} AS failing
        RUN sleep 1; echo failing now; exit 4
        FROM {busybox}
        COPY --from=slow /etc/passwd /a
        COPY --from=failing /etc/passwd /b
        """,
    )
    start = time.monotonic()
    err = imgci.fails("build", "--progress", "plain", str(ctx))
    elapsed = time.monotonic() - start
    assert "exit code 4" in err and f"{ctx / 'Dockerfile'}:4:" in err, err
    assert elapsed < 15, f"the build took {elapsed:.1f}s: the running stage was not cancelled"
    no_sandbox_leftovers(imgci, marker)
    assert imgci.run("ls", "-q").stdout.split() == [busybox]


def _kill_leftovers(marker: str) -> None:
    """End processes a failed test left behind (by pid, only those running ``marker``)."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_build_stops_its_run_and_cleans_up(
    imgci: Imgci, busybox: str, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C, or a CI job cancelled (SIGTERM, then SIGKILL after a grace period): the RUN must not outlive imgci."""
    marker = f"sleep {700000 + int(sig) * 1000 + os.getpid() % 1000}"
    ctx = _context(tmp_path, f"FROM {busybox}\nRUN echo started; {marker}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgci", "build", "--progress", "plain", str(ctx)],
        env=imgci.environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        while line := proc.stderr.readline():
            if line.rstrip().endswith(" started"):  # the RUN's own output: the command is running
                break
        proc.send_signal(sig)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", marker]).returncode == 0:
            time.sleep(0.2)
        no_sandbox_leftovers(imgci, marker)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(marker)


# -- 5. network ---------------------------------------------------------------------------------------------------
def _interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line}


@pytest.fixture
def loopback_http() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering every GET with ``hello from the host``; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_run_network_host_by_default_and_none_on_request(
    imgci: Imgci, busybox: str, tmp_path: Path, loopback_http: int
) -> None:
    url = f"http://127.0.0.1:{loopback_http}/"
    # (no wget -T: Debian's busybox 1.35 wget crashes with it)
    probe = f"if wget -q -O- {url} > /dev/null 2>&1; then echo reached; else echo unreachable; fi"
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox}
        RUN wget -q -O /got {url} && cat /proc/net/dev > /netdev-default
        RUN --network=none cat /proc/net/dev > /netdev-none && {probe} > /wget-none
        RUN --network=host {probe} > /wget-host
        """,
    )
    imgci.run("build", "-t", "test/network:1", str(ctx))
    root = _files(imgci, "test/network:1", tmp_path)
    host = _interfaces(Path("/proc/net/dev").read_text())
    assert (root / "got").read_text() == "hello from the host\n"
    assert _interfaces((root / "netdev-default").read_text()) == host
    assert _interfaces((root / "netdev-none").read_text()) == {"lo"}
    assert (root / "wget-none").read_text() == "unreachable\n"
    assert (root / "wget-host").read_text() == "reached\n"

    # --network none on the command line: every RUN without its own --network
    ctx2 = tmp_path / "ctx2"
    ctx2.mkdir()
    (ctx2 / "Dockerfile").write_text(
        f"FROM {busybox}\nRUN cat /proc/net/dev > /netdev && {probe} > /wget\nRUN --network=host {probe} > /wget-host\n"
    )
    imgci.run("build", "--network", "none", "-t", "test/network:2", str(ctx2))
    root2 = _files(imgci, "test/network:2", tmp_path)
    assert _interfaces((root2 / "netdev").read_text()) == {"lo"}
    assert (root2 / "wget").read_text() == "unreachable\n"
    assert (root2 / "wget-host").read_text() == "reached\n"


# -- 6. chroot without mount permission ---------------------------------------------------------------------------
NO_MOUNT_DOCKERFILE = """\
FROM localhost/busybox:latest
RUN echo written > /written && echo x > /dev/null && cat /dev/null && head -c 4 /dev/urandom | wc -c > /urandom \\
    && cat /etc/hosts > /hosts-seen && test -f /etc/resolv.conf && ls -A /proc > /proc-ls
RUN --mount=type=secret,id=tok md5sum /run/secrets/tok | cut -d' ' -f1 > /tok-md5 && cat /run/secrets/tok
RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t && cat /scratch/t > /tmpfs-seen
RUN --mount=type=cache,target=/cache echo c >> /cache/log && cat /cache/log > /cache-seen
RUN --mount=type=bind,target=/ctx cat /ctx/data > /bind-seen
RUN <<EOF
#!/bin/sh
echo "script $0" > /script-ran
EOF
"""


def test_chroot_without_mount_permission(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    tok = b"nomount-" + os.urandom(8).hex().encode()
    (tmp_path / "tok").write_bytes(tok)
    ctx = _context(tmp_path, NO_MOUNT_DOCKERFILE, {"data": "from the context\n"})
    imgci.env["SOURCE_DATE_EPOCH"] = EPOCH
    argv = [sys.executable, "-m", "imgci", "build", "--progress", "plain", "--isolation", "chroot"]
    argv += ["--secret", f"id=tok,src={tmp_path / 'tok'}", "-t", "test/nomount:1", str(ctx)]
    proc = subprocess.run([*NO_SYS_ADMIN, *argv], env=imgci.environ(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sandbox: chroot:" in proc.stderr and "sandbox: native:" in proc.stderr, proc.stderr
    assert "/proc" in proc.stderr and "warning:" in proc.stderr, proc.stderr
    assert tok.decode() not in proc.stderr and "****" in proc.stderr

    root = _files(imgci, "test/nomount:1", tmp_path)
    assert (root / "written").read_text() == "written\n"
    assert (root / "urandom").read_text().strip() == "4"
    assert "buildkitsandbox" in (root / "hosts-seen").read_text()
    assert (root / "tok-md5").read_text().strip() == hashlib.md5(tok).hexdigest()
    assert (root / "tmpfs-seen").read_text() == "t\n"
    assert (root / "cache-seen").read_text() == "c\n"
    assert [p.read_text() for p in (imgci.state / "cache" / "mounts").glob("*/log")] == ["c\n"]  # moved back
    assert (root / "proc-ls").read_text() == ""  # no /proc without mount permission (the warning says so)
    assert (root / "bind-seen").read_text() == "from the context\n"
    assert (root / "script-ran").read_text() == "script /dev/pipes/EOF\n"
    # nothing of the emulation is in the image: device nodes, hosts, resolv.conf, the secret, mount contents
    assert os.listdir(root / "dev") == [] and os.listdir(root / "proc") == [] and os.listdir(root / "sys") == []
    for gone in ("etc/hosts", "etc/resolv.conf", "run", "scratch", "cache", "ctx"):
        assert not (root / gone).exists(), gone
    blobs = layer_blobs(imgci, "test/nomount:1")[1:]
    layers = [sorted(layer_members(b)) for b in blobs]
    # each layer holds exactly what the step wrote: not dev/ or etc/, whose mtimes the emulation touched
    assert layers == [
        ["hosts-seen", "proc-ls", "sys", "urandom", "written"],  # /sys: the mount point BuildKit leaves
        ["tok-md5"],
        ["tmpfs-seen"],
        ["cache-seen"],
        ["bind-seen"],
        ["script-ran"],
    ], layers
    for blob in blobs:
        with tarfile.open(blob) as t:
            for m in t.getmembers():
                if m.isreg():
                    assert tok not in t.extractfile(m).read()  # type: ignore[union-attr]
    no_sandbox_leftovers(imgci)


def test_chroot_without_pid_namespace_leaves_no_daemon_behind(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    """Without a pid namespace a RUN's leftovers are killed by group; one that started its own session (a daemon)
    must not outlive the step either."""
    marker = f"sleep {600000 + os.getpid() % 90000}"
    ctx = _context(
        tmp_path, f"FROM {busybox}\nRUN setsid {marker} > /dev/null 2>&1 < /dev/null & sleep 0.3; echo spawned\n"
    )
    argv = [sys.executable, "-m", "imgci", "build", "--isolation", "chroot", str(ctx)]
    try:
        proc = subprocess.run([*NO_SYS_ADMIN, *argv], env=imgci.environ(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        no_sandbox_leftovers(imgci, marker)
    finally:
        _kill_leftovers(marker)


@pytest.mark.parametrize("isolation", ["userns", "chroot"])
def test_run_gets_dockers_default_capabilities_only(imgci: Imgci, busybox: str, tmp_path: Path, isolation: str) -> None:
    ctx = _context(
        tmp_path,
        f"""
        FROM {busybox}
        RUN grep -E '^Cap(Eff|Bnd)' /proc/self/status > /root-caps
        USER 1000
        RUN grep -E '^Cap(Eff|Bnd)' /proc/self/status > /tmp/user-caps
        USER root
        RUN if mount -t tmpfs none /mnt 2>/dev/null; then exit 9; fi
        """,
    )
    imgci.run("build", "--isolation", isolation, "-t", f"test/caps-{isolation}:1", str(ctx))
    root = _files(imgci, f"test/caps-{isolation}:1", tmp_path)
    # docker's default set (chown dac_override fowner fsetid kill setgid setuid setpcap net_bind_service net_raw
    # sys_chroot mknod audit_write setfcap): no sys_admin, whatever imgci itself holds
    assert (root / "root-caps").read_text().split() == ["CapEff:", "00000000a80425fb", "CapBnd:", "00000000a80425fb"]
    assert (root / "tmp" / "user-caps").read_text().split() == [
        "CapEff:",
        "0000000000000000",
        "CapBnd:",
        "00000000a80425fb",
    ]


def test_a_run_after_copy_is_the_same_whether_its_snapshot_is_linked_or_extracted(
    imgci_factory: Callable[[], Imgci], busybox_tar: Path, tmp_path: Path
) -> None:
    """A COPY layer's overlay snapshot is made of hard links to the layer store's unpacked copy (as root); the RUN
    on top of it must give the very same layers as with the snapshot extracted from the blob, and as native."""
    ctx = tmp_path / "ctx"
    (ctx / "app" / "bin").mkdir(parents=True)
    (ctx / "app" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (ctx / "app" / "bin" / "tool").chmod(0o755)
    (ctx / "app" / "conf").write_text("a=1\n")
    (ctx / "app" / "gone").write_text("removed by the RUN\n")
    (ctx / "app" / "current").symlink_to("bin/tool")
    (ctx / "Dockerfile").write_text(
        "FROM localhost/busybox:latest\n"
        "COPY --chown=1000:1000 app/ /app/\n"
        "RUN echo b=2 >> /app/conf && chmod 700 /app/bin/tool && rm /app/gone && ln /app/conf /app/conf.hard"
        " && chown 0:0 /app/bin && cat /app/current > /dev/null\n"
    )
    digests = {}
    for name, backend, links in (("linked", "overlay", "1"), ("extracted", "overlay", "0"), ("native", "native", "1")):
        cli = imgci_factory()
        cli.env.update(SOURCE_DATE_EPOCH=EPOCH, IMGCI_SNAPSHOT_LINKS=links)
        cli.run("import", str(busybox_tar), "localhost/busybox:latest")
        digests[name] = cli.run("build", "-q", "-b", backend, "--isolation", "userns", str(ctx)).stdout.strip()
        if name == "linked":  # the snapshot of the COPY layer shares its files' inodes with the layer store
            linked = [p for p in cli.state.glob("snapshots/*/*/app/conf") if p.stat().st_nlink >= 2]
            assert linked, "the COPY layer's snapshot was extracted, not linked"
    assert digests["linked"] == digests["extracted"] == digests["native"], digests
