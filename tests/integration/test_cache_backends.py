"""Cache import/export backends through the CLI: a registry ref and a local directory, against the real test
registry (through a FaultProxy to count and break requests), with fresh state directories on the importing side.

One module-scoped build exports its cache (mode=max) to the registry and to a local directory; each test imports
it into a fresh state and checks what ran, what was downloaded, and what a broken cache does (warn and build).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgci.cache.backends import make_exporter, make_importer, parse_cache_from, parse_cache_to
from imgci.cache.records import CacheRecord
from imgci.errors import ImgciError
from imgci.oci import OCI_LAYER_GZIP, Descriptor, Digest
from imgci.registry.client import ClientPool
from imgci.registry.retry import RetryPolicy
from imgci.store import Store
from tests.conftest import Imgci
from tests.infra.client import SimpleRegistryClient
from tests.infra.faultproxy import FaultProxy, corrupt_body, status
from tests.infra.registry import RegistryServer, free_port
from tests.integration.conftest_registry import login_to, trust

EPOCH = "1700000000"  # the base image is imported with a fixed date: the same digest in every state dir
DOCKERFILE = """
FROM localhost/busybox:latest AS builder
RUN head -c 4000 /dev/urandom > /tool.bin && echo built > /out.txt
RUN head -c 3000 /dev/urandom > /scratch.bin
FROM localhost/busybox:latest
COPY app.txt /app.txt
RUN head -c 1000 /dev/urandom > /rand.bin
COPY --from=builder /out.txt /out.txt
CMD ["cat", "/out.txt"]
"""
STEPS = 6  # RUN, RUN (builder); COPY, RUN, COPY --from, CMD (final): five layers, CMD has none


@dataclass
class Exported:
    ctx: Path
    repo: str  # repository of the registry cache
    tag: str
    local: Path
    digest: str  # the image the exporting build made
    log: str
    cache_layers: set[str]  # layer digests in the registry cache manifest
    records_digest: str


def _import_base(cli: Imgci, busybox_tar: Path) -> None:
    cli.env["SOURCE_DATE_EPOCH"] = EPOCH
    cli.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    del cli.env["SOURCE_DATE_EPOCH"]


def _build(cli: Imgci, ctx: Path, *extra: str, check: bool = True) -> tuple[str, dict, str, int]:
    """(image digest, imgci.cache metadata, stderr, exit status) of a plain-progress build."""
    meta = ctx.parent / f"meta-{time.monotonic_ns()}.json"
    proc = cli.run("build", "--progress", "plain", "--metadata-file", str(meta), *extra, str(ctx), check=check)
    if proc.returncode != 0:
        return "", {}, proc.stderr, proc.returncode
    doc = json.loads(meta.read_text())
    return doc["containerimage.digest"], doc["imgci.cache"], proc.stderr, 0


def _executed(log: str) -> list[str]:
    names = dict(re.findall(r"^#(\d+) (\[.*)$", log, re.M))
    done = set(re.findall(r"^#(\d+) DONE", log, re.M))
    return sorted(names[n] for n in done if n in names and " FROM " not in names[n])


def _blob_gets(proxy: FaultProxy, repo: str) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in proxy.requests if r.method == "GET" and f"/v2/{repo}/blobs/" in r.path]


def _layers(cli: Imgci, name: str) -> set[str]:
    manifest = json.loads(cli.run("inspect", name, "--type", "manifest").stdout)
    return {x["digest"] for x in manifest["layers"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer, busybox_tar: Path) -> Exported:
    work = tmp_path_factory.mktemp("cache-export")
    (work / "docker").mkdir()
    cli = Imgci(state=work / "state", docker_config=work / "docker")
    _import_base(cli, busybox_tar)
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(textwrap.dedent(DOCKERFILE).lstrip())
    (ctx / "app.txt").write_text("app\n")
    repo, tag = "cache/app", "buildcache"
    digest, cache, log, _ = _build(
        cli,
        ctx,
        "--cache-to",
        f"type=registry,ref={registry.host}/{repo}:{tag},mode=max",
        "--cache-to",
        f"type=local,dest={work / 'local'},mode=max",
    )
    assert cache["misses"] == STEPS
    assert f"cache exported to {registry.host}/{repo}:{tag}: {STEPS} records, 5 blobs (5 written, 0 already" in log
    assert f"cache exported to local:{work / 'local'}: {STEPS} records, 5 blobs (5 written" in log
    body, _ = SimpleRegistryClient(registry.url).get_manifest(repo, tag)
    manifest = json.loads(body)
    assert manifest["artifactType"] == "application/vnd.imgci.cache.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.imgci.cache.records.v1+json"
    return Exported(
        ctx,
        repo,
        tag,
        work / "local",
        digest,
        log,
        {x["digest"] for x in manifest["layers"]},
        manifest["config"]["digest"],
    )


@pytest.fixture
def fresh(imgci_factory: Callable[[], Imgci], busybox_tar: Path) -> Callable[[], Imgci]:
    def make() -> Imgci:
        cli = imgci_factory()
        _import_base(cli, busybox_tar)
        return cli

    return make


def test_registry_round_trip_into_a_fresh_state_downloads_only_what_the_image_needs(
    exported: Exported, fresh: Callable[[], Imgci], proxy: FaultProxy
) -> None:
    cli = fresh()
    ref = f"{proxy.host}/{exported.repo}:{exported.tag}"
    other = f"{proxy.host}/cache/other:buildcache"
    digest, cache, log, _ = _build(
        cli,
        exported.ctx,
        "-t",
        "cache/result",
        "--cache-from",
        f"{proxy.host}/cache/branch:buildcache",  # a branch without a cache yet: a note, then the next one
        "--cache-from",
        ref,
        "--cache-to",
        f"type=registry,ref={other},mode=max",
    )
    assert digest == exported.digest
    assert _executed(log) == [] and log.count("CACHED") == STEPS
    assert cache["hits"] == STEPS and cache["misses"] == 0
    assert {s["source"] for s in cache["steps"]} == {ref}
    assert f"cache {proxy.host}/cache/branch:buildcache: not found (no cache exported there yet)" in log
    assert "warning" not in log

    final = _layers(cli, "cache/result:latest")
    needed = final & exported.cache_layers  # the final stage's three layers (the base is local)
    intermediate = exported.cache_layers - final  # the builder stage's two RUN layers
    assert (len(needed), len(intermediate)) == (3, 2)
    gets = _blob_gets(proxy, exported.repo)
    assert sorted(gets) == sorted([exported.records_digest, *needed])  # once each; the builder's never
    assert not intermediate & set(gets)

    # The export to another repository of the same registry mounted every layer (HEAD first, then mount),
    # including the two it never downloaded, and uploaded only the records blob.
    mounts = [r for r in proxy.requests if r.method == "POST" and "mount=" in r.path and r.status == 201]
    assert len(mounts) == 5
    assert proxy.count("POST", r"/v2/cache/other/blobs/uploads/$") == 1
    assert "5 blobs (0 written, 5 mounted, 0 already there)" in log
    assert not intermediate & set(_blob_gets(proxy, exported.repo))

    # The usual CI loop, --cache-from X --cache-to X: HEAD finds every layer, only the new records blob is sent,
    # and still no layer is downloaded (the final stage's are local now, the builder's are not needed).
    proxy.clear()
    _, cache2, log2, _ = _build(
        cli, exported.ctx, "--cache-from", other, "--cache-to", f"type=registry,ref={other},mode=max"
    )
    assert cache2["misses"] == 0
    assert "5 blobs (0 written, 5 already there)" in log2
    assert proxy.count("HEAD", r"/v2/cache/other/blobs/sha256:") == 6  # 5 layers + the records blob
    assert proxy.count("POST", r"/blobs/uploads/") == 1 and proxy.count("PUT", r"/manifests/buildcache") == 1
    gets2 = _blob_gets(proxy, "cache/other")
    assert len(gets2) == 1 and gets2[0] not in exported.cache_layers  # the records blob only


def test_min_mode_exports_only_the_final_chain(
    exported: Exported, fresh: Callable[[], Imgci], registry: RegistryServer
) -> None:
    cli = fresh()
    ref = f"{registry.host}/cache/min:bc"
    _, cache, log, _ = _build(cli, exported.ctx, "--cache-from", f"type=local,src={exported.local}", "--cache-to", ref)
    assert cache["misses"] == 0
    assert f"cache exported to {ref}: 4 records, 3 blobs (3 written, 0 already there)" in log
    digest, cache2, log2, _ = _build(fresh(), exported.ctx, "--cache-from", f"type=registry,ref={ref}")
    assert digest == exported.digest
    final = {s["step"] for s in cache2["steps"] if s["cached"]}
    assert len(final) == 4 and all(s.startswith("[stage-1 ") for s in final)
    # The builder stage is not in a min cache; today it runs although its only consumer (COPY --from) hits.
    assert all(s.startswith("[builder ") for s in _executed(log2))


def test_local_directory_round_trip(exported: Exported, fresh: Callable[[], Imgci], tmp_path: Path) -> None:
    cli = fresh()
    again = tmp_path / "again"
    digest, cache, log, _ = _build(
        cli,
        exported.ctx,
        "--cache-from",
        f"type=local,src={exported.local}",
        "--cache-to",
        f"type=local,dest={again},mode=max,compression=zstd",
    )
    assert digest == exported.digest
    assert _executed(log) == [] and cache["hits"] == STEPS
    assert {s["source"] for s in cache["steps"]} == {f"local:{exported.local}"}
    assert f"note: cache export to local:{again}: compression=zstd is not applied; layers are exported as built" in log
    # mode=max re-exports every record; the builder's layers, never needed here, were copied from the source dir.
    assert f"cache exported to local:{again}: {STEPS} records, 5 blobs (5 written, 0 already there)" in log
    assert len(_check_layout(again)) == STEPS
    # the imported records are now local, metadata steps (CMD) included: a plain rebuild is the same image
    digest, cache, log, _ = _build(cli, exported.ctx)
    assert digest == exported.digest and _executed(log) == [] and cache["misses"] == 0


def _check_layout(root: Path) -> list[dict]:
    """Every blob index.json reaches exists and verifies, nothing else is in blobs/; returns the records."""
    index = json.loads((root / "index.json").read_text())
    (entry,) = index["manifests"]

    def blob(desc: dict) -> bytes:
        data = (root / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        assert len(data) == desc["size"] and Digest.of(data).value == desc["digest"]
        return data

    manifest = json.loads(blob(entry))
    records = json.loads(blob(manifest["config"]))["records"]
    for layer in manifest["layers"]:
        blob(layer)
    referenced = {x["descriptor"]["digest"] for r in records for x in r["layers"]}
    assert referenced == {x["digest"] for x in manifest["layers"]}
    present = {"sha256:" + p.name for p in (root / "blobs" / "sha256").iterdir()}
    assert present == {entry["digest"], manifest["config"]["digest"], *referenced}
    return records


def _lock_waiters(lock: Path) -> int:
    """Processes blocked on a flock of ``lock`` (the "->" lines of /proc/locks for its inode)."""
    inode = f":{lock.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


def test_two_builds_export_to_one_directory_at_once(
    fresh: Callable[[], Imgci], busybox_tar: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "shared-cache"
    dest.mkdir()
    lock = dest / ".lock"
    names = ("one", "two")
    procs = []
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both exports queue behind us, then race for the lock together
        for name in names:
            cli = fresh()
            ctx = tmp_path / f"ctx-{name}"
            ctx.mkdir()
            (ctx / "Dockerfile").write_text(
                f"FROM localhost/busybox:latest\nRUN head -c 3000000 /dev/urandom > /{name}.bin\nRUN echo {name} >/n\n"
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "imgci", "build", "--cache-to", f"type=local,dest={dest}", str(ctx)],
                    env=cli.environ(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 60
        while _lock_waiters(lock) < len(names) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "an export did not wait for DIR/.lock"
            time.sleep(0.05)
        assert _lock_waiters(lock) == len(names)
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "warning" not in err, err
    records = _check_layout(dest)
    assert sorted(r["instruction"] for r in records) == sorted(
        [f"RUN head -c 3000000 /dev/urandom > /{n}.bin" for n in names] + [f"RUN echo {n} >/n" for n in names]
    )


def test_broken_caches_are_warnings_and_the_build_does_the_work(
    exported: Exported, fresh: Callable[[], Imgci], proxy: FaultProxy
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy.add_fault(None, r"/v2/cache/fail500/", times=None, action=status(500))
    proxy.add_fault("GET", exported.records_digest, times=None, action=corrupt_body(offset=10))
    cli = fresh()
    digest, cache, log, _ = _build(
        cli,
        exported.ctx,
        "--retries",
        "2",
        "--cache-from",
        f"{dead}/cache/app:buildcache",  # nobody listens there
        "--cache-from",
        f"{proxy.host}/cache/fail500:buildcache",  # 500 on every request
        "--cache-from",
        f"{proxy.host}/{exported.repo}:{exported.tag}",  # the records blob arrives corrupt
        "--cache-to",
        f"type=registry,ref={dead}/cache/out:bc",
    )
    assert digest and digest != exported.digest  # built again: new random bytes
    assert cache["misses"] == STEPS and len(_executed(log)) == STEPS
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4, log
    assert f"cache {dead}/cache/app:buildcache:" in warnings[0]
    assert "fail500" in warnings[1] and "500" in warnings[1]
    assert "digest mismatch" in warnings[2]
    assert all(w.endswith("continuing without it") for w in warnings[:3])
    assert warnings[3].startswith(f"warning: cache export to {dead}/cache/out:bc failed:")
    assert proxy.count("GET", exported.records_digest) >= 1

    # ignore-error=false: the build fails, naming the cache registry (the local cache makes it quick).
    _, _, err, code = _build(
        cli,
        exported.ctx,
        "--retries",
        "1",
        "--cache-to",
        f"type=registry,ref={dead}/x:y,ignore-error=false",
        check=False,
    )
    assert code == 1 and "Traceback" not in err
    assert f"error: cache export to {dead}/x:y failed:" in err


def test_a_corrupt_layer_blob_makes_that_step_run(
    exported: Exported, fresh: Callable[[], Imgci], proxy: FaultProxy
) -> None:
    records = json.loads(SimpleRegistryClient(proxy.url).get_blob(exported.repo, exported.records_digest))["records"]
    (run_layer,) = [
        r["layers"][0]["descriptor"]["digest"] for r in records if r["instruction"].startswith("RUN head -c 1000")
    ]
    proxy.add_fault("GET", run_layer, times=None, action=corrupt_body(offset=100))
    cli = fresh()
    digest, _, log, _ = _build(
        cli, exported.ctx, "--retries", "2", "--cache-from", f"{proxy.host}/{exported.repo}:{exported.tag}"
    )
    assert digest and digest != exported.digest
    assert f"layer {run_layer.split(':')[1][:12]}" in log and "building those steps instead" in log
    assert _executed(log) == ["[stage-1 3/5] RUN head -c 1000 /dev/urandom > /rand.bin"]


def test_inline_cache_round_trip_through_the_pushed_image(
    exported: Exported, fresh: Callable[[], Imgci], proxy: FaultProxy
) -> None:
    image = f"{proxy.host}/cache/inline:1"
    digest, _, _, _ = _build(
        fresh(),
        exported.ctx,
        "-t",
        image,
        "--push",
        "--cache-from",
        f"type=local,src={exported.local}",
        "--cache-to",
        "type=inline",
    )
    proxy.clear()
    cli = fresh()
    digest2, cache, log, _ = _build(
        cli, exported.ctx, "-t", "cache/inline", "--cache-from", image, "--cache-to", "type=inline"
    )
    assert digest2 == digest
    hits = {s["step"] for s in cache["steps"] if s["cached"]}
    assert len(hits) == 4 and all(s.startswith("[stage-1 ") for s in hits)  # the final chain (min)
    assert all(s.startswith("[builder ") for s in _executed(log))
    config = json.loads(cli.run("inspect", "cache/inline", "--type", "config").stdout)
    assert [r["instruction"] for r in config["imgci.cache.v1"]][-1] == 'CMD ["cat", "/out.txt"]'
    # an image built FROM it does not inherit its cache records
    child = exported.ctx.parent / "child"
    child.mkdir(exist_ok=True)
    (child / "Dockerfile").write_text("FROM cache/inline\nENV CHILD=1\n")
    cli.run("build", "-t", "cache/child", str(child))
    assert "imgci.cache.v1" not in json.loads(cli.run("inspect", "cache/child", "--type", "config").stdout)

    # An image without inline records: a warning that says how to get them, and a build without them.
    plain = f"{proxy.host}/cache/plain:1"
    _build(cli, exported.ctx, "-t", plain, "--push")
    _, cache3, log3, _ = _build(fresh(), exported.ctx, "--cache-from", plain)
    assert cache3["hits"] == 0
    assert f"warning: cache {plain}: {plain} is an image without an inline cache" in log3


# -- one contract, every backend (no build: hand-made records) ------------------------------------------------------
def _record(store: Store, key: str, *blobs: bytes) -> CacheRecord:
    layers = [(Descriptor(OCI_LAYER_GZIP, store.write_blob(b).digest, len(b)), Digest.of(b"diff" + b)) for b in blobs]
    return CacheRecord(key, f"parent-{key}", f"RUN {key}", {"k": key}, {"Env": [key]}, layers, [{"created_by": key}])


@pytest.mark.parametrize("backend", ["registry", "registry-tls-basic-auth", "local"])
def test_backend_contract(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, docker_config: Path, tmp_path: Path
) -> None:
    kind = backend.split("-")[0]
    if kind == "registry":
        reg: RegistryServer = request.getfixturevalue("basic_registry" if "auth" in backend else "registry")
        trust(reg, tmp_path, monkeypatch)
        login_to(reg)
        where, empty = f"{reg.host}/contract/{tmp_path.name}:c", f"{reg.host}/contract/none:c"
    else:
        where, empty = str(tmp_path / "dir"), str(tmp_path / "none")
    pool = ClientPool(retry=RetryPolicy(attempts=2, initial_backoff=0.01))
    key, src = ("ref", "ref") if kind == "registry" else ("dest", "src")
    exporter = make_exporter(parse_cache_to(f"type={kind},{key}={where}"), client_factory=pool)
    assert exporter is not None
    importer = make_importer(parse_cache_from(f"type={kind},{src}={where}"), client_factory=pool)

    store, remote = Store(tmp_path / "store"), Store(tmp_path / "remote")
    shared = os.urandom(2000)
    records = [_record(store, "a", b"a" * 100, shared), _record(store, "b", shared), _record(store, "c")]
    records.append(_record(remote, "far", b"only remote"))  # a hit another cache left remote: fetched on export
    fetched: list[Descriptor] = []

    def fetch(d: Descriptor) -> None:
        fetched.append(d)
        store.write_blob(remote.read_blob(d.digest), d.digest)

    result = exporter.export(records, store, fetch)
    assert (result.records, result.blobs, result.uploaded, result.existing) == (4, 3, 3, 0)
    assert [d.digest for d in fetched] == [records[3].layers[0][0].digest]

    for r in records:
        got = importer.lookup(r.key)
        assert got is not None and got.dumps() == r.dumps()
    assert importer.lookup("unknown") is None
    fresh = Store(tmp_path / "fresh")
    for d, _ in records[0].layers:
        importer.fetch_blob(d, fresh)
        importer.fetch_blob(d, fresh)  # already there: nothing to do
        assert fresh.read_blob(d.digest) == store.read_blob(d.digest)
    liar = Descriptor(OCI_LAYER_GZIP, records[1].layers[0][0].digest, 10)  # the right digest, a wrong size
    with pytest.raises(ImgciError):
        importer.fetch_blob(liar, Store(tmp_path / "other"))

    again = exporter.export(records[:2], store, fetch)
    assert (again.uploaded, again.existing) == (0, 2)

    notes: list[str] = []
    nothing = make_importer(parse_cache_from(f"type={kind},{src}={empty}"), client_factory=pool, on_note=notes.append)
    assert nothing.lookup("a") is None and len(notes) == 1
    pool.close()


def test_bad_cache_flags_fail_before_anything_is_built(imgci: Imgci, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM localhost/nothing:here\n")
    err = imgci.fails("build", "--cache-to", "type=regsitry,ref=r/app:c", str(tmp_path), code=2)
    assert "--cache-to: unknown type 'regsitry' (did you mean registry?)" in err
    err = imgci.fails("build", "--cache-from", "type=local", str(tmp_path), code=2)
    assert "--cache-from: type=local needs src=" in err
