"""Write tests/conformance/expected/<case>.json by building every case with the reference builders.

Usage (as root, on a machine with Debian's docker.io and buildah; see README.md):

    python tests/conformance/make_expected.py --start-dockerd            # all cases, both references
    python tests/conformance/make_expected.py --case copy_chown_names    # one case, docker already running
    python tests/conformance/make_expected.py --check                    # rebuild, diff against the files

The primary reference is BuildKit (``docker build`` with DOCKER_BUILDKIT=1); buildah, when present, builds
every case too and the differences are recorded in the expectation (``"buildah"``). Cases whose case.json
has ``"manual"`` are written by hand and never overwritten. ``--start-dockerd`` runs a private dockerd
(data-root, exec-root and socket under a temporary directory, no bridge, no iptables) for the duration of
the run and stops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conformance.harness import (
    BUILDER_IGNORES,
    EXPECTED_DIR,
    FIXTURES_DIR,
    build_order,
    compare,
    dumps,
    list_cases,
    load_case,
    make_base_rootfs,
)
from tests.conformance.references import (
    Buildah,
    DockerBuildKit,
    Reference,
    ReferenceError,
    build_case,
    start_session,
)
from tests.infra.process import terminate

#: small archives kept as harness fixtures (FROM scratch: no busybox layer, a few KB each)
FIXTURE_CASES = ("from_scratch",)
RESULT_KEYS = ("config", "history", "layers", "delta")


@contextlib.contextmanager
def private_dockerd(workdir: Path, storage_driver: str) -> Iterator[str]:
    """A dockerd of our own; yields its DOCKER_HOST."""
    sock = workdir / "docker.sock"
    log = open(workdir / "dockerd.log", "wb")  # noqa: SIM115 - closed in the finally below
    cmd = [
        "dockerd",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        f"--storage-driver={storage_driver}",
        f"--data-root={workdir / 'data'}",
        f"--exec-root={workdir / 'exec'}",
        f"--pidfile={workdir / 'dockerd.pid'}",
        f"--host=unix://{sock}",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (workdir / "dockerd.log").read_text(errors="replace")[-4000:]
                raise SystemExit(f"dockerd exited {proc.returncode}:\n{tail}")
            ok = subprocess.run(
                ["docker", "-H", host, "version"], capture_output=True, stdin=subprocess.DEVNULL
            ).returncode
            if ok == 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit("dockerd did not answer within 60 s; see " + str(workdir / "dockerd.log"))
            time.sleep(0.5)
        yield host
    finally:
        terminate(proc, 30)
        log.close()


def _provenance(ref: Reference) -> dict[str, Any]:
    return {"name": ref.name, "describe": ref.describe(), **ref.version()}


def run(args: argparse.Namespace) -> int:
    names = args.case or list_cases()
    manual = [n for n in names if load_case(n).manual]
    names = [n for n in build_order(names) if not load_case(n).manual]
    work = Path(tempfile.mkdtemp(prefix="imgci-conformance-"))
    refs: list[Reference] = []
    if not args.no_docker:
        d = DockerBuildKit(prune_cache=not args.keep_build_cache)
        if d.available():
            refs.append(d)
        else:
            print("docker: no daemon reachable (skipping BuildKit)", file=sys.stderr)
    if not args.no_buildah:
        b = Buildah(workdir=work / "buildah-storage")
        if b.available():
            refs.append(b)
        else:
            print("buildah: not usable (skipping)", file=sys.stderr)
    if not refs:
        print("error: no reference builder available", file=sys.stderr)
        return 2
    rootfs = make_base_rootfs(work / "base-rootfs.tar")
    sessions = {}
    for ref in refs:
        sessions[ref.name] = start_session(ref, work / ref.name, rootfs)
        print(f"{ref.describe()}: base {sessions[ref.name].base_ref}", file=sys.stderr)
    primary = refs[0]
    failures = 0
    for name in names:
        case = load_case(name)
        results: dict[str, Any] = {}
        for ref in refs:
            try:
                results[ref.name] = build_case(sessions[ref.name], case)
            except ReferenceError as e:
                results[ref.name] = e
                print(f"{name}: {ref.name} failed: {e}", file=sys.stderr)
        main = results[primary.name]
        if isinstance(main, Exception):
            failures += 1
            continue
        doc: dict[str, Any] = {
            "case": name,
            "description": case.spec.get("description", ""),
            "reference": primary.describe(),
            "reference_versions": {r.name: _provenance(r) for r in refs},
            "build": {"build_args": case.build_args, "target": case.target, "base": case.base, "needs": case.needs},
        }
        for other in refs[1:]:
            res = results[other.name]
            if isinstance(res, Exception):
                doc[other.name] = {"agrees": False, "error": str(res).strip().splitlines()[-1][:500]}
            else:
                diffs = compare(main.result, res.result, ignore=BUILDER_IGNORES)
                doc[other.name] = {"agrees": not diffs, "differences": diffs}
                if args.verbose and diffs:
                    print(f"{name}: {other.name} differs:\n  " + "\n  ".join(diffs), file=sys.stderr)
        if case.spec.get("derived"):
            doc["derived"] = case.spec["derived"]
        if case.spec.get("ignore"):
            doc["ignore"] = case.spec["ignore"]
        doc.update({k: main.result[k] for k in RESULT_KEYS})
        path = EXPECTED_DIR / f"{name}.json"
        text = dumps(doc) + "\n"
        if args.check:
            if not path.exists():
                print(f"{name}: no expected file", file=sys.stderr)
                failures += 1
            else:
                old = json.loads(path.read_text())
                diffs = compare({k: old[k] for k in RESULT_KEYS}, main.result)
                if diffs:
                    failures += 1
                    print(f"{name}: differs from {path.name}:\n  " + "\n  ".join(diffs), file=sys.stderr)
                else:
                    print(f"{name}: ok", file=sys.stderr)
        else:
            EXPECTED_DIR.mkdir(exist_ok=True)
            path.write_text(text)
            agree = ", ".join(f"{r.name} {'agrees' if doc[r.name].get('agrees') else 'differs'}" for r in refs[1:])
            print(f"{name}: written ({agree or 'no second reference'})", file=sys.stderr)
        if name in FIXTURE_CASES and args.fixtures:
            FIXTURES_DIR.mkdir(exist_ok=True)
            shutil.copyfile(main.archive, FIXTURES_DIR / f"{name}.{primary.name}.docker.tar")
            for ref in refs:
                if ref.name == "buildah" and not isinstance(results.get("buildah"), Exception):
                    out = FIXTURES_DIR / f"{name}.buildah.oci.tar"
                    out.unlink(missing_ok=True)
                    subprocess.run(
                        [
                            ref.buildah,
                            *ref.global_args,
                            "push",
                            ref.image_ref(results["buildah"].tag),  # type: ignore[attr-defined]
                            f"oci-archive:{out}:{results['buildah'].tag}",
                        ],
                        check=True,
                        capture_output=True,
                    )
        if args.keep:
            keep = Path(args.keep) / name
            keep.mkdir(parents=True, exist_ok=True)
            for rname, res in results.items():
                if not isinstance(res, Exception):
                    shutil.copyfile(res.archive, keep / f"{rname}.tar")
                    (keep / f"{rname}.log").write_text(res.log)
                    (keep / f"{rname}.json").write_text(json.dumps(res.result, indent=1) + "\n")
    if manual:
        print(f"manual (not rebuilt): {', '.join(manual)}", file=sys.stderr)
    for ref in refs:
        with contextlib.suppress(Exception):
            ref.remove(*(b.tag for b in sessions[ref.name].built.values()))
        ref.close()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="only this case (repeatable; needed cases are built too)")
    p.add_argument("--start-dockerd", action="store_true", help="run a private dockerd for this run")
    p.add_argument("--storage-driver", default="overlay2", help="for --start-dockerd (overlay2 or vfs)")
    p.add_argument("--no-docker", action="store_true", help="do not use BuildKit")
    p.add_argument("--no-buildah", action="store_true", help="do not use buildah")
    p.add_argument(
        "--keep-build-cache",
        action="store_true",
        help="do not run `docker builder prune --all` before each build (it is needed: see references.py)",
    )
    p.add_argument("--check", action="store_true", help="compare with the expected files instead of writing")
    p.add_argument("--fixtures", action="store_true", help="refresh the small archives in fixtures/")
    p.add_argument("--keep", metavar="DIR", help="keep each reference's archive, log and normalised JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.start_dockerd and not args.no_docker:
        ddir = Path(tempfile.mkdtemp(prefix="imgci-dockerd-"))
        try:
            with private_dockerd(ddir, args.storage_driver) as host:
                os.environ["DOCKER_HOST"] = host
                return run(args)
        finally:
            shutil.rmtree(ddir, ignore_errors=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
