"""The local build cache through the CLI: reuse, exactly what re-runs after a change, miss explanations, opt-outs,
pruning, and keys that do not depend on where the checkout or the state directory is."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from tests.conftest import Imgci
from tests.integration.test_build import _context

DOCKERFILE = """
ARG BASE
FROM $BASE AS deps
ARG VERSION=1.2
COPY requirements.txt /app/
RUN echo "installing $VERSION" && cat /app/requirements.txt > /app/installed
FROM $BASE AS final
COPY --from=deps /app/installed /app/installed
COPY src/ /app/src/
RUN ls /app/src > /app/listing
ENV MODE=prod
"""
FILES = {"requirements.txt": "flask\n", "src/app.py": "print('hi')\n", "src/util.py": "x = 1\n"}


def _build(imgci: Imgci, ctx: Path, tmp_path: Path, *extra: str) -> tuple[str, dict, str]:
    meta = tmp_path / f"meta-{time.monotonic_ns()}.json"
    proc = imgci.run(
        "build",
        "--progress",
        "plain",
        "--metadata-file",
        str(meta),
        "--build-arg",
        "BASE=localhost/busybox:latest",
        *extra,
        "-t",
        "cache/app:1",
        str(ctx),
    )
    doc = json.loads(meta.read_text())
    return doc["containerimage.digest"], doc["imgci.cache"], proc.stderr


def _executed(log: str) -> list[str]:
    """Names of the steps that ran (not CACHED) in a plain progress log."""
    names = dict(re.findall(r"^#(\d+) (\[.*)$", log, re.M))
    done = set(re.findall(r"^#(\d+) DONE", log, re.M))
    return sorted(names[n] for n in done if n in names and " FROM " not in names[n])


def test_rebuild_without_change_runs_nothing_and_gives_the_same_image(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, DOCKERFILE, FILES)
    digest1, cache1, log1 = _build(imgci, ctx, tmp_path)
    assert cache1["hits"] == 0 and cache1["misses"] == 7
    assert len(_executed(log1)) == 7
    digest2, cache2, log2 = _build(imgci, ctx, tmp_path)
    assert _executed(log2) == []
    assert log2.count("CACHED") == 7
    assert cache2["hits"] == 7 and cache2["misses"] == 0 and cache2["time_saved"] > 0
    assert digest2 == digest1  # a rebuild served from the cache is the same image
    assert "Cache: 7 of 7 steps reused" in log2


def test_one_changed_file_reruns_only_what_depends_on_it_and_says_why(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, DOCKERFILE, FILES)
    _build(imgci, ctx, tmp_path)
    (ctx / "src" / "app.py").write_text("print('changed')\n")
    _, cache, log = _build(imgci, ctx, tmp_path)
    ran = _executed(log)
    assert ran == [
        "[final 3/5] COPY src/ /app/src/",
        "[final 4/5] RUN ls /app/src > /app/listing",
        "[final 5/5] ENV MODE=prod",
    ]
    misses = {s["step"]: s["reason"] for s in cache["steps"] if not s["cached"]}
    assert misses["[final 3/5] COPY src/ /app/src/"] == "COPY sources changed: src/app.py"
    assert misses["[final 4/5] RUN ls /app/src > /app/listing"] == "parent step missed"
    assert "cache miss: COPY sources changed: src/app.py" in log
    # mtimes never enter a key: touching every file, or a fresh copy of the checkout elsewhere, changes nothing
    for p in ctx.rglob("*"):
        os.utime(p, None)
    moved = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(ctx, moved)
    _, cache, log = _build(imgci, moved, tmp_path)
    assert _executed(log) == [] and cache["misses"] == 0


def test_build_arg_and_base_image_changes_are_explained(
    imgci: Imgci, busybox: str, busybox_tar: Path, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, DOCKERFILE, FILES)
    _build(imgci, ctx, tmp_path)
    _, cache, _ = _build(imgci, ctx, tmp_path, "--build-arg", "VERSION=1.3")
    misses = {s["step"]: s["reason"] for s in cache["steps"] if not s["cached"]}
    assert misses["[deps 2/4] ARG VERSION=1.2"] == "ARG VERSION: 1.2 → 1.3"
    # the final stage keys on the deps stage's key: a changed stage re-runs what copies from it
    assert misses["[final 2/5] COPY --from=deps /app/installed /app/installed"] == "COPY --from source changed"
    # a new base image under the same name: every step misses, the first ones say why
    imgci.run("import", str(busybox_tar), "localhost/busybox:latest", "--change", 'CMD=["sh", "-x"]')
    _, cache, _ = _build(imgci, ctx, tmp_path, "--build-arg", "VERSION=1.3")
    reasons = [s["reason"] for s in cache["steps"] if not s["cached"]]
    assert cache["hits"] == 0
    assert any(
        r.startswith("base image docker.io/localhost/busybox:latest digest changed")
        or r.startswith("base image localhost/busybox:latest digest changed")
        for r in reasons
    ), reasons


def test_no_cache_and_no_cache_filter(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    ctx = _context(tmp_path, DOCKERFILE, FILES)
    _build(imgci, ctx, tmp_path)
    _, cache, log = _build(imgci, ctx, tmp_path, "--no-cache")
    assert cache["hits"] == 0 and len(_executed(log)) == 7
    assert {s["reason"] for s in cache["steps"]} == {"--no-cache"}
    _, cache, log = _build(imgci, ctx, tmp_path, "--no-cache-filter", "deps")
    ran = _executed(log)
    assert [r for r in ran if r.startswith("[deps")] == [
        "[deps 2/4] ARG VERSION=1.2",
        "[deps 3/4] COPY requirements.txt /app/",
        '[deps 4/4] RUN echo "installing $VERSION" && cat /app/requirements.txt > /app/installed',
    ]
    assert not [r for r in ran if r.startswith("[final")]  # same results from deps: the final stage is reused


def test_failed_build_keeps_what_succeeded_and_prune_honours_the_cache(
    imgci: Imgci, busybox: str, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, DOCKERFILE + "RUN exit 7\n", FILES)
    proc = imgci.run(
        "build", "--progress", "plain", "--build-arg", "BASE=localhost/busybox:latest", str(ctx), check=False
    )
    assert proc.returncode == 1 and "exit code 7" in proc.stderr
    (ctx / "Dockerfile").write_text(DOCKERFILE.lstrip())
    _, cache, log = _build(imgci, ctx, tmp_path)
    assert _executed(log) == [] and cache["hits"] == 7  # every step before the failure is reused
    # plain prune keeps the cache (its layers are gc roots); --filter/--keep-storage/--all drop it
    imgci.run("rm", "cache/app:1")
    imgci.run("prune")
    _, cache, _ = _build(imgci, ctx, tmp_path)
    assert cache["hits"] == 7
    out = imgci.run("prune", "--filter", "until=1h").stdout
    assert "build cache" not in out  # nothing that old
    out = imgci.run("prune", "--keep-storage", "0").stdout
    assert re.search(r"\d+ build cache entries", out), out
    _, cache, _ = _build(imgci, ctx, tmp_path)
    layered = [s for s in cache["steps"] if s["step"].split("] ")[1].startswith(("COPY", "RUN"))]
    assert layered and not any(s["cached"] for s in layered)  # every entry that held storage is gone
    imgci.run("prune", "--all")
    assert imgci.run("fsck").returncode == 0
    err = imgci.fails("prune", "--filter", "since=1h", code=2)
    assert "until=DURATION" in err


def test_add_url_is_keyed_on_what_the_server_sends(imgci: Imgci, busybox: str, tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    served = tmp_path / "www"
    served.mkdir()
    (served / "data.txt").write_text("one\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.txt"
        ctx = _context(tmp_path, f"ARG BASE\nFROM $BASE\nADD {url} /data.txt\nRUN cat /data.txt > /copy\n")
        _build(imgci, ctx, tmp_path)
        _, cache, _ = _build(imgci, ctx, tmp_path)
        assert cache["misses"] == 0
        (served / "data.txt").write_text("two\n")
        _, cache, _ = _build(imgci, ctx, tmp_path)
        reasons = [s["reason"] for s in cache["steps"] if not s["cached"]]
        assert reasons[0] == f"ADD remote source changed: {url}"
        assert len(reasons) == 2
    finally:
        server.shutdown()
        server.server_close()
