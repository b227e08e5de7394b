"""Every case in tests/conformance/cases built with ``imgci build``, compared with the reference's result.

For each case: import the conformance base rootfs (``imgci import``, same config as the reference's
``docker import -c``), build the case through the CLI (``python -m imgci build -f <case>/Dockerfile
--build-arg BASE=<base> -t conformance/<case> <materialised context>``), ``imgci save`` the image, normalise
it and compare with ``expected/<case>.json`` (the checked-in expectation CI uses). When a reference builder
is usable here (see conftest.py), the same case is also built live with it and compared.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conformance.harness import (
    BASE_CHANGES,
    BUILDER_IGNORES,
    DEFAULT_IGNORES,
    build_order,
    compare,
    list_cases,
    load_case,
)
from tests.conformance.references import BASE_TAG, Built, Reference, Session, build_case, start_session
from tests.conftest import Imgci

pytestmark = pytest.mark.conformance


class ImgciBuilder:
    """The imgci CLI with the interface references.build_case expects of a reference builder."""

    name = "imgci"

    def __init__(self, imgci: Imgci) -> None:
        self.imgci = imgci

    def load_base(self, rootfs_tar: Path, out_archive: Path) -> str:
        ref = "localhost/" + BASE_TAG
        changes = [a for c in BASE_CHANGES for a in ("--change", c)]
        self.imgci.run("import", str(rootfs_tar), ref, *changes)
        self.save(ref, out_archive)
        return ref

    def image_ref(self, tag: str) -> str:
        return tag

    def build(
        self, dockerfile: Path, context: Path, tag: str, build_args: dict[str, str], target: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = ["build", "-f", str(dockerfile), "-t", tag]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        if target:
            args += ["--target", target]
        return self.imgci.run(*args, str(context), timeout=600)

    def save(self, tag: str, out_archive: Path) -> None:
        self.imgci.run("save", "-o", str(out_archive), tag)


KNOWN_DIFFERENCES = json.loads((Path(__file__).parent / "known_differences.json").read_text())


def _ignores(base: dict[str, str]) -> dict[str, str]:
    extra = [k.strip() for k in os.environ.get("IMGCI_CONFORMANCE_IGNORE", "").split(",") if k.strip()]
    out = {**base, **{k: "IMGCI_CONFORMANCE_IGNORE" for k in extra}}
    if os.environ.get("IMGCI_CONFORMANCE_STRICT") == "1":
        out.pop("history.created_by.wording", None)
    return out


def _params() -> list[object]:
    """Every case; those listed in known_differences.json are strict xfails: a fix makes them XPASS and fail,
    which is the signal to delete the entry."""
    out: list[object] = []
    for name in list_cases():
        reason = KNOWN_DIFFERENCES.get(name)
        marks = [pytest.mark.xfail(reason=f"known difference: {reason}", strict=True)] if reason else []
        out.append(pytest.param(name, marks=marks))
    return out


def _build_with_needs(session: Session, name: str) -> Built:
    for dep in build_order([name]):
        if dep not in session.built:
            build_case(session, load_case(dep))
    return session.built[name]


@pytest.mark.parametrize("name", _params())
def test_case(
    name: str,
    imgci: Imgci,
    tmp_path: Path,
    conformance_rootfs: Path,
    live_reference: tuple[Reference, Session] | None,
) -> None:
    case = load_case(name)
    session = start_session(ImgciBuilder(imgci), tmp_path / "imgci", conformance_rootfs)
    actual = _build_with_needs(session, name).result

    diffs = compare(case.expected(), actual, ignore=_ignores(DEFAULT_IGNORES))
    problems = [f"vs expected/{name}.json ({case.expected()['reference']}):", *diffs] if diffs else []

    if live_reference is not None and not case.manual:
        ref, ref_session = live_reference
        live = _build_with_needs(ref_session, name).result
        if ref.name == "buildkit":
            # a daemon we do not own is not pruned, and BuildKit 0.8 serves WORKDIR's mkdir from its cache
            # even with --no-cache: directory mtimes may come from an earlier build
            ignore = {**DEFAULT_IGNORES, "mtime.dir": "live daemon's build cache"}
            live_diffs = compare(live, actual, ignore=_ignores(ignore))
        elif case.expected().get("buildah", {}).get("agrees"):
            live_diffs = compare(live, actual, ignore=_ignores(BUILDER_IGNORES))
        else:
            live_diffs = []  # buildah is known to differ from BuildKit here (see the expectation's "buildah")
        if live_diffs:
            problems += [f"vs a live {ref.describe()} build:", *live_diffs]

    assert not problems, "\n".join(problems)
