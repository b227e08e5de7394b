"""Crashes and concurrency on one state directory: kill -9 at random points, two builds and a pruner, a full disk.

What is checked after each fault is the state directory's contract (imgci/store.py): ``imgci fsck`` (every blob
re-hashed, every ref's closure and every build cache blob present, nothing but digests under ``blobs/``) passes;
the interrupted operation, run again, completes and reuses what the killed run had finished; ``imgci prune`` then
leaves no temp file of a dead process (``ingest/``, ``layers/.tmp-*``, ``snapshots/*/.tmp-*``, ``tmp/run-*``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imgci.cache.local import LocalCache
from imgci.cache.records import CacheRecord
from imgci.oci import OCI_LAYER, Descriptor, Digest
from imgci.store import Store
from tests.conftest import Imgci
from tests.infra.faultproxy import FaultProxy, delay
from tests.infra.registry import RegistryServer

SEED = 1234
ROUNDS = 20
_HEX64 = re.compile(r"[0-9a-f]{64}")

# A few COPY/RUN steps and one ~5 MB (incompressible) layer; ROUND keys the RUN steps, so each round builds afresh.
DOCKERFILE = """\
FROM {base}
ARG ROUND=0
COPY a.txt /a.txt
RUN echo "$ROUND" > /round && sleep 0.2
COPY data.bin /data.bin
RUN head -c 5000000 /dev/urandom > /big && echo "$ROUND" > /big-round && sleep 0.2
RUN echo "$ROUND" > /three
"""


# -- helpers ---------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """A run of ``python -m imgci`` that was SIGKILLed after ``after`` seconds unless it had finished."""

    output: str
    killed: bool
    returncode: int

    def events(self) -> list[dict[str, object]]:
        """The ``--progress json`` events in the output (other lines skipped; a line cut by the kill too)."""
        out = []
        for line in self.output.splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def steps_done(self) -> set[str]:
        """Names of the steps (not FROM) that the run reported done: their cache records were committed first."""
        return {str(e["name"]) for e in self.events() if e.get("event") == "done" and "] FROM " not in str(e["name"])}


def _process_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> set[int]:
    children = _process_children()
    out: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.add(child)
            stack.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # an orphan nobody reaps stays a zombie; it holds nothing


def _run_killed(cli: Imgci, args: list[str], after: float, log: Path, *, marker: str = "") -> Outcome:
    """Start ``imgci ARGS``, SIGKILL it ``after`` seconds later (counted from when ``marker`` appears in its output,
    if given) unless it finished, and wait until the processes it started (sandbox children) are gone too: they
    must notice that their parent died and clean up on their own."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgci", *args], env=cli.environ(), stdout=out, stderr=subprocess.STDOUT
        )
        start = time.monotonic()
        while marker and proc.poll() is None and marker not in log.read_text(errors="replace"):
            assert time.monotonic() - start < 60, f"imgci {' '.join(args)}: no {marker!r} in its output"
            time.sleep(0.005)
        deadline = time.monotonic() + after
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        family: set[int] = set()
        killed = proc.poll() is None
        if killed:
            family = _descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    limit = time.monotonic() + 20
    while any(_running(p) for p in family):
        assert time.monotonic() < limit, f"children of the killed imgci outlive it: {sorted(family)}"
        time.sleep(0.05)
    return Outcome(log.read_text(errors="replace"), killed, proc.returncode)


def _assert_store_consistent(cli: Imgci, context: str) -> None:
    proc = cli.run("fsck", check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), f"{context}: fsck\n{proc.stdout}{proc.stderr}"
    for algo in (cli.state / "blobs").iterdir():
        stray = [p.name for p in algo.iterdir() if not (_HEX64.fullmatch(p.name) and p.is_file())]
        assert not stray, f"{context}: not a blob, yet under blobs/{algo.name}: {stray}"


def _assert_no_leftovers(state: Path, context: str) -> None:
    """After ``imgci prune``: nothing of a dead process's work in progress is left."""
    left = [
        *(state / "ingest").glob("*"),
        *(state / "layers").glob(".tmp-*"),
        *state.glob("snapshots/*/.tmp-*"),
        *(state / "tmp").glob("run-*"),
    ]
    assert not left, f"{context}: temp files of dead processes survive prune: {left}"


def _blob_digests(cli: Imgci, image: str) -> list[str]:
    manifest = json.loads(cli.run("inspect", image).stdout)["Manifest"]
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def _registry_has(registry: RegistryServer, repo: str, digest: str) -> bool:
    request = urllib.request.Request(f"{registry.url}/v2/{repo}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


def _context(tmp_path: Path, base: str) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base=base))
    (ctx / "a.txt").write_text("a\n")
    (ctx / "data.bin").write_bytes(random.Random(7).randbytes(200_000))
    return ctx


# -- 1. kill -9 at random points ------------------------------------------------------------------------------------
LAST_STEP_DONE = '"event": "done", "name": "[stage-0 7/7]'  # a --progress json line: what follows is the export


class Killer:
    """Runs one operation per round and SIGKILLs it at a random point; remembers every outcome."""

    def __init__(self, cli: Imgci, rng: random.Random, logs: Path) -> None:
        self.cli, self.rng, self.logs = cli, rng, logs
        self.outcomes: list[tuple[str, Outcome]] = []
        self.round, self.op = 0, ""

    def __call__(self, args: list[str], *, marker: str = "", window: tuple[float, float] = (0.05, 1.5)) -> Outcome:
        after = self.rng.uniform(*window)
        log = self.logs / f"round{self.round}-{len(self.outcomes)}.log"
        outcome = _run_killed(self.cli, args, after, log, marker=marker)
        if not outcome.killed:
            assert outcome.returncode == 0, f"round {self.round}: imgci {' '.join(args)} failed:\n{outcome.output}"
        self.outcomes.append((self.op, outcome))
        return outcome


@dataclass
class CrashLoop:
    cli: Imgci
    make_cli: Callable[[], Imgci]
    registry: RegistryServer
    proxy: FaultProxy
    ctx: Path
    work: Path
    source: str  # the image `pull` fetches (through the proxy)
    built: list[str] = field(default_factory=list)  # images of build rounds, not pushed yet

    def build_args(self, round_: str, *extra: str) -> list[str]:
        return ["build", "--progress", "json", "--build-arg", f"ROUND={round_}", *extra, str(self.ctx)]

    def op_pull(self, n: int, kill: Killer, rerun: bool) -> None:
        self.cli.run("rm", self.source, check=False)  # so that the pull fetches again
        outcome = kill(["pull", self.source])
        _assert_store_consistent(self.cli, f"pull #{n}")
        if not rerun:
            return
        present = {p.name for p in (self.cli.state / "blobs" / "sha256").iterdir()}
        self.proxy.clear()
        self.cli.run("pull", self.source)
        fetched = [r.path for r in self.proxy.requests if r.method == "GET" and "/blobs/sha256:" in r.path]
        refetched = [p for p in fetched if p.rsplit("sha256:", 1)[1].split("?")[0] in present]
        assert not refetched, f"pull #{n}: blobs the killed pull had stored were fetched again: {refetched}"
        assert outcome.killed or not fetched
        self.cli.run("unpack", self.source, "-o", str(self.work / f"pulled{n}"))

    def op_build(self, n: int, kill: Killer, rerun: bool) -> None:
        args = self.build_args(f"b{n}", "-t", f"localhost/crash/app:{n}")
        done = kill(args).steps_done()
        _assert_store_consistent(self.cli, f"build #{n}")
        again = self.cli.run(*args)  # always: the reuse check is the point of this operation
        self.built.append(f"localhost/crash/app:{n}")
        cached = {str(e["name"]) for e in Outcome(again.stderr, False, 0).events() if e.get("cached")}
        # Honest reuse check: every step the killed run reported done (its cache record committed) is a hit now.
        assert done <= cached, f"build #{n}: steps done before the kill were not reused: {sorted(done - cached)}"
        if done:  # (a kill between a record's commit and its event line makes a hit we cannot predict: no `else`)
            assert "Cache: 0 of" not in again.stderr, again.stderr[-500:]

    def op_push(self, n: int, kill: Killer, rerun: bool) -> None:
        repo = f"crash/push{n}"
        target = f"{self.proxy.host}/{repo}:1"
        # An image with a ~5 MB layer the registry has not seen yet: one a build round made, or a new one.
        if self.built:
            self.cli.run("tag", self.built.pop(), target)
        else:
            self.cli.run(*self.build_args(f"p{n}", "-t", target))
        kill(["push", target])
        _assert_store_consistent(self.cli, f"push #{n}")
        if not rerun:
            return
        digests = _blob_digests(self.cli, target)
        there = sum(_registry_has(self.registry, repo, d) for d in digests)
        out = self.cli.run("push", target).stdout
        counts = re.search(r"Uploaded (\d+) blobs .*, (\d+) already present, (\d+) mounted", out)
        assert counts is not None, out
        uploaded, present, mounted = (int(x) for x in counts.groups())
        # Nothing that was there goes up again: found there (HEAD), or mounted from a repository known to hold
        # it (a registry mounts a blob the destination has just the same, so that one may count as mounted).
        assert uploaded <= len(digests) - there, f"push #{n}: {there} blobs were there:\n{out}"
        assert present + mounted >= there, f"push #{n}: {there} blobs were there:\n{out}"
        assert all(_registry_has(self.registry, repo, d) for d in digests), f"push #{n}: incomplete in the registry"

    def op_export(self, n: int, kill: Killer, rerun: bool) -> None:
        dest = self.work / f"cache{n}"
        args = self.build_args(f"x{n}", "--cache-to", f"type=local,dest={dest},mode=max")
        if not kill(args).killed:
            # The export takes ~50 ms of a ~1.5 s build: a random kill rarely lands in it. Export the (now cached)
            # build again into a new directory and kill that at a random point after its last step finished.
            dest = self.work / f"cache{n}b"
            args = self.build_args(f"x{n}", "--cache-to", f"type=local,dest={dest},mode=max")
            kill(args, marker=LAST_STEP_DONE, window=(0.0, 0.08))
        _assert_store_consistent(self.cli, f"export #{n}")
        if not rerun:
            # Whatever the kill left in the directory reads as the old cache or the new one: a build from it works.
            self._build_from_cache(dest)
            return
        self.cli.run(*args)
        assert not list(dest.glob("**/.tmp-*")), f"export #{n}: temp files left in {dest}"
        missed = self._build_from_cache(dest, f"x{n}")
        assert not missed, f"export #{n}: the exported cache misses {missed}"

    def _build_from_cache(self, dest: Path, round_: str = "other") -> list[str]:
        """Build in an empty state dir with ``--cache-from`` the directory; returns the steps that missed."""
        fresh = self.make_cli()
        try:
            build = fresh.run(*self.build_args(round_, "--cache-from", f"type=local,src={dest}"))
            ran = Outcome(build.stderr, False, 0)
            return sorted(name for name in ran.steps_done() if not _cached(ran, name))
        finally:
            shutil.rmtree(fresh.state, ignore_errors=True)


def _cached(outcome: Outcome, name: str) -> bool:
    return any(e.get("name") == name and e.get("cached") for e in outcome.events() if e.get("event") == "done")


@pytest.fixture
def crash_loop(
    imgci: Imgci, imgci_factory: Callable[[], Imgci], registry: RegistryServer, busybox_tar: Path, tmp_path: Path
) -> Iterator[CrashLoop]:
    # The base image and the pull source come from the registry, so that a fresh state dir resolves the same FROM.
    publisher = imgci_factory()
    base = f"{registry.host}/crash/base:1"
    publisher.run("import", str(busybox_tar), base, "--change", 'CMD=["sh"]')
    publisher.run("push", base)
    ctx = _context(tmp_path, base)
    source = f"{registry.host}/crash/src:1"
    publisher.run("build", "--build-arg", "ROUND=src", "-t", source, str(ctx))
    publisher.run("push", source)
    with FaultProxy(registry.url) as proxy:
        # Slow every registry request through the proxy a little, so that kills land inside pulls and pushes.
        proxy.add_fault(None, r"^/v2/crash/", times=None, action=delay(0.1))
        yield CrashLoop(imgci, imgci_factory, registry, proxy, ctx, tmp_path, f"{proxy.host}/crash/src:1")


def test_kill_9_at_random_points_keeps_the_store_consistent(crash_loop: CrashLoop, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ops = ["pull", "build", "push", "export"] * (ROUNDS // 4)
    rng.shuffle(ops)
    kill = Killer(crash_loop.cli, rng, tmp_path)
    started = time.monotonic()
    for n, op in enumerate(ops):
        kill.round, kill.op = n, op
        getattr(crash_loop, f"op_{op}")(n, kill, n % 2 == 0)  # re-run every other round (builds: always)
        if n % 5 == 4:
            crash_loop.cli.run("prune")
            _assert_no_leftovers(crash_loop.cli.state, f"round {n}")
            _assert_store_consistent(crash_loop.cli, f"round {n} after prune")
    killed_in = sorted(op for op, o in kill.outcomes if o.killed)
    print(f"{ROUNDS} rounds, {len(kill.outcomes)} runs, killed in {killed_in}, {time.monotonic() - started:.1f}s")
    assert {"pull", "build", "push", "export"} <= set(killed_in), "some operation was never interrupted"
    assert time.monotonic() - started < 90


# -- 2. two builds and a pruner on one state dir --------------------------------------------------------------------
# Each build's last RUN reads what the steps before it wrote (its overlay lowers, cache hits from the previous
# round): a prune that takes a snapshot, layer or blob from under a running build makes the RUN or the build fail.
CONCURRENT = """\
FROM localhost/busybox:latest
COPY {name}.txt /{name}.txt
RUN head -c 3000000 /dev/urandom > /{name}-big && seq 1 20000 > /{name}-lines
ARG ROUND
RUN sleep 0.3 && test "$(wc -c < /{name}-big)" = 3000000 && test "$(wc -l < /{name}-lines)" = 20000 \\
    && cat /{name}.txt /bin/busybox > /dev/null && echo "$ROUND" > /{name}-round
"""


def test_two_builds_and_prune_share_a_state_dir(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    contexts = {}
    for name in ("alpha", "beta"):
        ctx = tmp_path / name
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(CONCURRENT.format(name=name))
        (ctx / f"{name}.txt").write_text(f"{name}\n")
        contexts[name] = ctx
    script = tmp_path / "builder.sh"
    # Three rounds per builder: the first builds everything, the next ones reuse the cache up to the last RUN. Only
    # the last is tagged: no ref keeps the earlier rounds' layers, only the cache records and the builds using them.
    script.write_text(
        'set -e\nfor round in 1 2 3; do\n  tag=""; [ $round = 3 ] && tag="-t localhost/$NAME:3"\n'
        '  "$PY" -m imgci build --progress plain --build-arg ROUND=$round $tag "$CTX"\ndone\n'
    )
    builders = {
        name: subprocess.Popen(
            ["sh", str(script)],
            env={**imgci.environ(), "PY": sys.executable, "NAME": name, "CTX": str(ctx)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, ctx in contexts.items()
    }
    prunes: list[subprocess.CompletedProcess[str]] = []
    while any(p.poll() is None for p in builders.values()) or len(prunes) < 4:
        # Plain prune, and --all: that one drops the build cache records, so blobs and layers that running
        # builds hold only by their leases and locks are fair game for it.
        prunes.append(imgci.run("prune", *(["--all"] if len(prunes) % 4 == 3 else []), check=False))
        time.sleep(0.05)
    outputs = {name: p.communicate(timeout=120)[0] for name, p in builders.items()}
    for name, p in builders.items():
        assert p.returncode == 0, f"build {name} failed next to prune:\n{outputs[name][-3000:]}"
    for prune in prunes:
        assert prune.returncode == 0 and "Traceback" not in prune.stderr, prune.stderr
    assert len(prunes) >= 4
    _assert_store_consistent(imgci, "after concurrent builds and prunes")
    for name in contexts:
        root = tmp_path / f"unpacked-{name}"
        imgci.run("unpack", f"localhost/{name}:3", "-o", str(root))
        assert (root / f"{name}-big").stat().st_size == 3000000
        assert (root / f"{name}-round").read_text() == "3\n"
    imgci.run("prune")
    _assert_no_leftovers(imgci.state, "after the last prune")
    _assert_store_consistent(imgci, "after the last prune")


class _RacingStore(Store):
    """A store that lets ``imgci prune --all`` run in another process right after it answered, outside the writer
    lock, whether a blob is present: the worst moment for a caller that looks before it claims."""

    def __init__(self, root: Path, cli: Imgci) -> None:
        super().__init__(root)
        self.cli = cli
        self.locked = 0
        self.raced = 0

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with super().writer_lock():
            self.locked += 1
            try:
                yield
            finally:
                self.locked -= 1

    def writer_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._counted()

    def has_blob(self, digest: Digest) -> bool:
        present = super().has_blob(digest)
        if present and not self.locked:
            self.raced += 1
            self.cli.run("prune", "--all")
        return present


def test_a_cache_hit_keeps_its_layers_from_a_concurrent_prune_all(imgci: Imgci) -> None:
    """Found by the case above run with ``prune --all``: LocalCache.lookup looked for the layer blobs, then claimed
    them ignoring the answer; a gc in between left the build a hit whose layer was gone."""
    writer = Store(imgci.state)
    layer = writer.write_blob(b"a layer")
    record = CacheRecord(
        key="sha256:" + "1" * 64,
        parent="sha256:" + "2" * 64,
        instruction="RUN true",
        inputs={},
        config={},
        layers=[(Descriptor(OCI_LAYER, layer.digest, layer.size), Digest.of(b"a layer"))],
    )
    LocalCache(writer).put(record)
    writer.close()  # the writer ends: only the cache record keeps the blob
    store = _RacingStore(imgci.state, imgci)
    hit = LocalCache(store).lookup(record.key)
    imgci.run("prune", "--all")  # and once more now that lookup returned
    assert hit is None or store.has_blob(layer.digest), f"a cache hit whose layer is gone (raced {store.raced}x)"
    _assert_store_consistent(imgci, "after the race")


# -- 3. a full disk under the state dir -----------------------------------------------------------------------------
@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs as the state dir (tests run as root)."""
    state = tmp_path / "small-state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _assert_intact_after_enospc(cli: Imgci, images: list[str], work: Path, context: str) -> None:
    _assert_store_consistent(cli, context)
    state = cli.state
    left = [*(state / "ingest").iterdir(), *(state / "tmp").iterdir(), *(state / "layers").glob(".tmp-*")]
    left += state.glob("snapshots/*/.tmp-*")
    assert not left, f"{context}: temp files left behind: {left}"
    assert cli.run("ls", "-q").stdout.split() == images
    for image in images:
        target = work / f"{context.replace(' ', '-')}-{image.rsplit('/', 1)[1].replace(':', '-')}"
        cli.run("unpack", image, "-o", str(target))  # every blob still readable and verified
        assert (target / "bin" / "busybox").is_file()


def test_disk_full_is_a_clear_error_and_keeps_the_store(small_state: Path, busybox_tar: Path, tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    cli = Imgci(state=small_state, docker_config=tmp_path / "docker")
    cli.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    ctx = tmp_path / "full-ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM localhost/busybox:latest\nRUN echo small > /small\n")
    cli.run("build", "-t", "localhost/small:1", str(ctx))
    images = ["localhost/busybox:latest", "localhost/small:1"]

    # A RUN writing 20 MB: its writable layer lives in the state dir, so the RUN itself runs out of space.
    (ctx / "Dockerfile").write_text("FROM localhost/busybox:latest\nRUN dd if=/dev/zero of=/big bs=1M count=20\n")
    err = cli.fails("build", "-t", "localhost/full:1", str(ctx))
    assert "no space left" in err.lower(), err
    _assert_intact_after_enospc(cli, images, tmp_path, "RUN out of space")

    # A layer that fits in the RUN's writable layer, but not a second time as a blob: imgci's own ENOSPC.
    free = _free(small_state)
    count = int(free * 0.6) // 65536
    (ctx / "Dockerfile").write_text(
        f"FROM localhost/busybox:latest\nRUN dd if=/dev/urandom of=/big bs=65536 count={count} 2>/dev/null\n"
    )
    err = cli.fails("build", "-t", "localhost/full:2", str(ctx))
    assert f"no space left in the state directory {small_state}" in err, err
    _assert_intact_after_enospc(cli, images, tmp_path, "blob out of space")

    cli.run("prune")  # what the hint says: the failed step's leftovers go, the images stay
    assert _free(small_state) >= free - (256 << 10), "prune did not give back the space of the failed builds"
    _assert_intact_after_enospc(cli, images, tmp_path, "after prune")

    # The disk filled to the last byte by something else: every command says so, none calls the store corrupt.
    _fill(small_state / "filler")
    (ctx / "Dockerfile").write_text("FROM localhost/busybox:latest\nRUN echo small > /small\n")
    for args in (["ls"], ["fsck"], ["prune"], ["build", "-t", "localhost/small:2", str(ctx)]):
        err = cli.fails(*args)
        assert f"no space left in the state directory {small_state}" in err, f"imgci {' '.join(args)}: {err}"
    (small_state / "filler").unlink()
    _assert_intact_after_enospc(cli, images, tmp_path, "after the disk was full")


def test_run_out_of_space_names_the_state_dir(small_state: Path, busybox_tar: Path, tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    cli = Imgci(state=small_state, docker_config=tmp_path / "docker")
    cli.run("import", str(busybox_tar), "localhost/busybox:latest")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM localhost/busybox:latest\nRUN dd if=/dev/zero of=/big bs=1M count=20\n")
    err = cli.fails("build", str(ctx))
    assert "No space left on device" in err  # the command's own words, then where the space ran out
    assert f"no space left in the state directory {small_state}" in err, err
    assert "Traceback" not in err


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    chunk = b"\0" * (1 << 16)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


# -- fsck itself ----------------------------------------------------------------------------------------------------
def test_fsck_sees_stray_files_among_blobs_and_missing_cache_blobs(imgci: Imgci, busybox: str) -> None:
    _assert_store_consistent(imgci, "a fresh import")
    store = Store(imgci.state)
    layer = store.write_blob(b"cached layer")
    record = CacheRecord(
        key="sha256:" + "3" * 64,
        parent="sha256:" + "4" * 64,
        instruction="RUN true",
        inputs={},
        config={},
        layers=[(Descriptor(OCI_LAYER, layer.digest, layer.size), Digest.of(b"cached layer"))],
    )
    LocalCache(store).put(record)
    store.close()
    stray = imgci.state / "blobs" / "sha256" / f"{'5' * 64}.tmp"
    stray.write_bytes(b"half a blob")  # what a writer without temp file + rename would leave
    store.blob_path(layer.digest).unlink()
    out = imgci.run("fsck", check=False)
    assert out.returncode == 1, out.stdout
    assert f"unexpected file {stray}" in out.stdout
    assert f"build cache entry {record.key[:19]}: blob {layer.digest} is missing" in out.stdout


# -- prune killed in the middle of removing a snapshot ---------------------------------------------------------------
MANY_FILES = """\
FROM localhost/busybox:latest
RUN mkdir /many && cd /many && seq 1 20000 | xargs touch
ARG ROUND
RUN test "$(ls /many | wc -l)" = 20000 && echo "$ROUND" > /round
"""


def test_prune_killed_while_removing_a_snapshot_leaves_no_half_of_it(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    """A snapshot (an overlay lower) is found by its name alone; a prune killed while deleting one must not leave
    part of it under that name, or every later RUN on that layer sees half a file system."""
    ctx = tmp_path / "many"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MANY_FILES)
    imgci.run("build", "--build-arg", "ROUND=1", str(ctx))  # untagged: only the build cache keeps its layers
    snapshots = [p for p in imgci.state.glob("snapshots/*/*") if (p / "many").is_dir()]
    assert len(snapshots) == 1, snapshots
    many = snapshots[0] / "many"
    with open(tmp_path / "prune.log", "wb") as log:
        prune = subprocess.Popen(
            [sys.executable, "-m", "imgci", "prune"], env=imgci.environ(), stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while prune.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if not (snapshots[0].exists() and len(os.listdir(many)) == 20000):
                    break  # the snapshot started to go (or went at once)
            time.sleep(0.002)
        assert prune.poll() is None, "prune finished before it could be killed while removing the snapshot"
        os.kill(prune.pid, signal.SIGKILL)
        prune.wait()
    _assert_store_consistent(imgci, "after the killed prune")
    # The step that made the files is a cache hit; the next RUN runs on its snapshot, whatever the prune left.
    build = imgci.run("build", "--progress", "plain", "--build-arg", "ROUND=2", str(ctx), check=False)
    assert build.returncode == 0, f"a RUN on a half-deleted snapshot:\n{build.stderr[-2000:]}"
    imgci.run("prune")
    _assert_no_leftovers(imgci.state, "after the next prune")
    assert not [p for p in imgci.state.glob("snapshots/*/.tmp-*")]
