"""``imgci run build.yaml`` end to end: a matrix built in one process with shared steps run once, pushed to the
test registry, skipped when unchanged, pushes retried through the fault proxy, failures kept to their entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Imgci
from tests.infra.client import SimpleRegistryClient, sha256_digest
from tests.infra.faultproxy import FaultProxy, reset_after, status
from tests.infra.registry import RegistryServer

pytestmark = pytest.mark.integration

DOCKERFILE = """\
FROM localhost/busybox:latest AS base
RUN echo shared base > /base.txt && sleep 1

FROM base AS runtime
ARG FLAVOUR
COPY app.txt /app.txt
RUN test "$FLAVOUR" != broken && echo "$FLAVOUR" > /flavour.txt
CMD ["cat", "/flavour.txt"]
"""


def _project(tmp_path: Path, yaml_text: str, dockerfile: str = DOCKERFILE) -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "Dockerfile").write_text(dockerfile)
    (project / "app.txt").write_text("app v1\n")
    (project / "build.yaml").write_text(yaml_text)
    return project


def _matrix_yaml(host: str, flavours: list[str], repo: str = "matrix/app", push: bool = True) -> str:
    return f"""\
version: 1
defaults:
  push: {str(push).lower()}
targets:
  app:
    target: runtime
    args:
      FLAVOUR: "${{{{ matrix.flavour }}}}"
    tags: ["{host}/{repo}:${{{{ matrix.flavour }}}}"]
    matrix:
      flavour: {json.dumps(flavours)}
"""


def _run(cli: Imgci, project: Path, *args: str, check: bool = True) -> tuple[Any, dict[str, Any]]:
    meta = project / "imgci-metadata.json"
    meta.unlink(missing_ok=True)
    proc = cli.run(
        "run", str(project / "build.yaml"), "--report", "none", "--metadata-file", str(meta), *args, check=check
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(meta.read_text())


def _remote_digest(client: SimpleRegistryClient, repo: str, tag: str) -> str:
    body, _ = client.get_manifest(repo, tag)
    return sha256_digest(body)


def _json_events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_matrix_shares_the_base_stage_and_pushes_every_entry(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    flavours = ["a", "b", "c", "d"]
    project = _project(tmp_path, _matrix_yaml(registry.host, flavours))
    proc, meta = _run(imgci, project, "--progress", "json")
    entries = meta["entries"]
    assert [e["id"] for e in entries] == [f"app-{f}" for f in flavours]
    assert all(e["status"] == "built" for e in entries), entries
    assert len({e["digest"] for e in entries}) == 4
    # the shared base RUN ran once for the four entries; each entry's own RUN ran once
    started = [e["name"] for e in _json_events(proc.stderr) if e["event"] == "started"]
    assert sum("sleep 1" in n for n in started) == 1, started
    assert sum("FLAVOUR" in n and "RUN" in n for n in started) == 4, started
    client = SimpleRegistryClient(registry.url)
    for e in entries:
        (push,) = e["pushes"]
        assert push["ok"] and push["attempts"] == 1 + len(push["retries"]), push
        assert _remote_digest(client, "matrix/app", e["matrix"]["flavour"]) == e["digest"]
        assert e["image_key"].startswith("sha256:")
        assert e["size"] > 0 and e["build_seconds"] > 0
    assert meta["ok"] is True
    # pushed in parallel, the layers the entries share were uploaded once: every distinct blob exactly once
    distinct: set[str] = set()
    for e in entries:
        body, _ = client.get_manifest("matrix/app", e["matrix"]["flavour"])
        manifest = json.loads(body)
        distinct |= {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
    assert sum(e["pushes"][0]["uploaded_blobs"] for e in entries) == len(distinct)
    # the summary table is on stdout, one row per entry
    for f in flavours:
        assert f"app (flavour={f})" in proc.stdout
    # the images are in the local store under their tags
    listed = imgci.run("ls", "-q").stdout.split()
    assert all(f"{registry.host}/matrix/app:{f}" in listed for f in flavours)


def test_unchanged_entries_are_not_rebuilt_only_tagged(
    imgci: Imgci, imgci_factory: Any, busybox_tar: Path, registry: RegistryServer, tmp_path: Path
) -> None:
    # the base image must be the same image on both runners (its digest roots every cache key)
    imgci.env["SOURCE_DATE_EPOCH"] = "0"
    imgci.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    project = _project(tmp_path, _matrix_yaml(registry.host, ["x", "y"], repo="skip/app"))
    _, first = _run(imgci, project)
    digests = {e["id"]: e["digest"] for e in first["entries"]}
    assert all(e["status"] == "built" for e in first["entries"])

    # a fresh CI runner (empty state) with the same inputs: nothing is rebuilt or uploaded
    fresh = imgci_factory()
    fresh.env["SOURCE_DATE_EPOCH"] = "0"
    fresh.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    proc, second = _run(fresh, project, "--progress", "json")
    assert [e["status"] for e in second["entries"]] == ["unchanged", "unchanged"], second
    assert {e["id"]: e["digest"] for e in second["entries"]} == digests
    assert not any(e["event"] == "started" for e in _json_events(proc.stderr))
    assert "not rebuilding" in proc.stderr

    # one more tag: added in the registry by digest, without a build
    proc, third = _run(
        fresh,
        project,
        "--set",
        f"app.tags={registry.host}/skip/app:${{{{ matrix.flavour }}}},"
        f"{registry.host}/skip/other:${{{{ matrix.flavour }}}}-extra",
    )
    assert [e["status"] for e in third["entries"]] == ["unchanged", "unchanged"]
    client = SimpleRegistryClient(registry.url)
    for e in third["entries"]:
        (push,) = e["pushes"]
        assert push["only_tagged"] and push["ok"], push
        assert _remote_digest(client, "skip/other", f"{e['matrix']['flavour']}-extra") == digests[e["id"]]

    # a changed context file rebuilds (both entries copy it)
    (project / "app.txt").write_text("app v2\n")
    _, fourth = _run(fresh, project)
    assert [e["status"] for e in fourth["entries"]] == ["built", "built"]
    assert all(e["digest"] != digests[e["id"]] for e in fourth["entries"])


def test_push_retries_through_faults_and_gives_up_past_the_bound(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    with FaultProxy(registry.url) as proxy:
        project = _project(tmp_path, _matrix_yaml(proxy.host, ["ok", "doomed"], repo="faults/app"))
        proxy.add_fault("PUT", r"/v2/faults/app/manifests/ok", times=1, action=status(429, {"Retry-After": "1"}))
        proxy.add_fault("POST", r"/v2/faults/app/blobs/uploads/", times=2, action=status(503))
        proxy.add_fault("PUT", r"/v2/faults/app/blobs/uploads/", times=1, action=reset_after(10))
        proxy.add_fault("PUT", r"/v2/faults/app/manifests/doomed", times=None, action=status(503))
        proc, meta = _run(imgci, project, "--retries", "3", check=False)
    assert proc.returncode == 1, proc.stderr
    ok, doomed = meta["entries"]
    assert ok["status"] == "built" and ok["pushes"][0]["ok"]
    assert ok["push_attempts"] > 1
    assert "HTTP 429" in ok["pushes"][0]["retries"]
    assert doomed["status"] == "failed" and not doomed["pushes"][0]["ok"]
    assert doomed["error"]["phase"] == "push"
    assert "gave up after 3 attempts" in doomed["error"]["message"]
    assert doomed["digest"]  # it was built: the digest is still reported
    assert "attempts" in proc.stdout  # the summary shows the retries
    assert meta["ok"] is False


def test_a_failed_entry_cancels_or_keeps_going(
    imgci: Imgci, busybox: str, registry: RegistryServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, _matrix_yaml(registry.host, ["good", "broken"], repo="fail/app", push=False))
    proc, meta = _run(imgci, project, "--keep-going", check=False)
    assert proc.returncode == 1
    good, broken = meta["entries"]
    assert good["status"] == "built" and good["digest"]
    assert broken["status"] == "failed"
    assert broken["error"]["line"] == 7 and broken["error"]["file"].endswith("Dockerfile")
    assert "Dockerfile:7" in proc.stderr
    assert f"{registry.host}/fail/app:good" in imgci.run("ls", "-q").stdout


def test_invalid_build_yaml_fails_before_building_with_its_line(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    project = _project(tmp_path, "version: 1\ntargets:\n  app:\n    tag: [x]\n")
    proc, meta = _run(imgci, project, check=False)
    assert proc.returncode == 2
    assert "build.yaml:4" in proc.stderr and "tags" in proc.stderr
    assert meta["ok"] is False and meta["error"]["line"] == 4

    bad_df = DOCKERFILE.replace("COPY app.txt", "COPPY app.txt")
    project = _project(tmp_path, _matrix_yaml("127.0.0.1:1", ["a"], push=False), dockerfile=bad_df)
    proc, meta = _run(imgci, project, check=False)
    assert proc.returncode == 2
    assert "Dockerfile:6" in proc.stderr, proc.stderr
    assert meta["error"]["line"] == 6


def test_dry_run_and_plan(imgci: Imgci, tmp_path: Path) -> None:
    project = _project(tmp_path, _matrix_yaml("127.0.0.1:1", ["a", "b"]))
    _, meta = _run(imgci, project, "--dry-run")
    assert [e["status"] for e in meta["entries"]] == ["planned", "planned"]
    shards = json.loads(imgci.run("plan", str(project / "build.yaml"), "--format", "github-matrix").stdout)
    assert [s["only"] for s in shards["include"]] == ["app-a", "app-b"]
    # each shard is runnable on its own
    _, meta = _run(imgci, project, "--dry-run", "--only", "app-b")
    assert [e["id"] for e in meta["entries"]] == ["app-b"]


def test_entries_sharing_a_registry_cache_export_it_once_and_a_fresh_runner_reuses_it(
    imgci: Imgci, imgci_factory: Any, busybox_tar: Path, registry: RegistryServer, tmp_path: Path
) -> None:
    """Two entries naming one registry cache ref: one export holding both entries' records, whose layers are
    mounted from the images just pushed (not uploaded again); an empty state dir then builds everything from it."""
    imgci.env["SOURCE_DATE_EPOCH"] = "0"
    imgci.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
    with FaultProxy(registry.url) as proxy:
        project = _project(tmp_path, _matrix_yaml(proxy.host, ["p", "q"], repo="cachetest/app"))
        cache = f"type=registry,ref={proxy.host}/cachetest/cache:buildcache,mode=max"
        proc, meta = _run(imgci, project, "--cache-to", cache)
        assert all(e["status"] == "built" for e in meta["entries"])
        assert len({tuple(e["cache_exports"]) for e in meta["entries"]}) == 1  # one export for both
        assert proc.stderr.count("cache export to") == 1  # the log line of the one export
        assert "0 written, 4 mounted" in meta["entries"][0]["cache_exports"][0]
        # the layers were there in cachetest/app: mounted into the cache repository, never uploaded again
        assert proxy.count("PATCH", r"/v2/cachetest/cache/blobs/uploads/") == 0
        assert proxy.count("PUT", r"/v2/cachetest/cache/blobs/uploads/.*digest=sha256") <= 1  # the records blob

        fresh = imgci_factory()
        fresh.env["SOURCE_DATE_EPOCH"] = "0"
        fresh.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh"]')
        bad, _ = _run(fresh, project, "--no-push", "--cache-from", cache, check=False)  # mode= is for --cache-to
        assert bad.returncode == 2 and "unknown key 'mode'" in bad.stderr and "build.yaml" not in bad.stderr
        cache_from = cache.removesuffix(",mode=max")
        proc, again = _run(fresh, project, "--no-push", "--cache-from", cache_from, "--progress", "json")
    assert [e["cache"]["misses"] for e in again["entries"]] == [0, 0], again["entries"]
    runs_done = [e for e in _json_events(proc.stderr) if e["event"] == "done" and "] RUN " in e["name"]]
    assert runs_done and all(e["cached"] for e in runs_done), runs_done
