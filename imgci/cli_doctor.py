"""``imgci doctor``: what the RUN sandbox can do here, what a build will use, and what to change if it cannot run.

Contract: prints one line per probe (``ok|warn|FAIL|skip  name: detail``, plus an indented ``fix:`` for each probe
that is not ok), then the isolation and backend a build with the same ``--isolation``/``--backend`` would use and
why. ``--format json`` prints the same as one JSON document. Exits 0 when builds can run RUN steps, 1 otherwise.
A failed probe is ``warn`` when builds still run without it, ``FAIL`` when it is why they cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgci.build.sandbox.probe import Probes

from imgci.errors import SandboxError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "doctor",
        help="Check what the RUN sandbox can do on this machine.",
        description="Probe user namespaces, id mapping, mounts, overlayfs and /proc; show what builds will use.",
        parents=[common],
    )
    p.set_defaults(handler=cmd_doctor)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--isolation", choices=["auto", "userns", "chroot"], default="auto", help="check this isolation")
    p.add_argument("-b", "--backend", choices=["auto", "overlay", "native"], default="auto", help="check this backend")


def scratch_dir(state: str | None) -> Path:
    """Where probes make their directories: the state directory's filesystem when it exists (snapshots live there)."""
    from imgci.store import default_root

    root = Path(state) if state else default_root()
    for candidate in (root / "tmp", root):
        if candidate.is_dir():
            return candidate
    return Path(tempfile.gettempdir())


def doctor_report(probes: Probes, isolation: str = "auto", backend: str = "auto", scratch: str = "") -> dict[str, Any]:
    """The report as plain data (what ``--format json`` prints): probes with their status, the choice or the error."""
    from imgci.build.sandbox.probe import choose

    choice: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    try:
        c = choose(isolation, backend, probes=probes)
        choice = {
            "isolation": c.isolation,
            "backend": c.backend,
            "idmap": {
                "kind": c.idmap.kind,
                "uid_map": [list(line) for line in c.idmap.uid_lines],
                "gid_map": [list(line) for line in c.idmap.gid_lines],
            },
            "reasons": c.reasons,
            "warnings": c.warnings,
        }
    except SandboxError as e:
        error = {"message": e.message, "hint": e.hint}
    blocking = {"userns", "chroot"} | ({"mount"} if probes.userns.ok else set())  # mounts fail when userns does
    blocking |= {"overlay", "chroot-overlay"} if backend == "overlay" else set()
    rows = []
    for name, result in probes.results():
        if result.skipped:
            status = "skip"
        elif result.ok:
            status = "ok"
        else:
            status = "fail" if error is not None and name in blocking else "warn"
        rows.append({"name": name, "status": status, "detail": result.detail, "fix": result.fix or None})
    return {"ok": choice is not None, "scratch": scratch, "probes": rows, "choice": choice, "error": error}


def render_text(report: dict[str, Any]) -> str:
    labels = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
    lines = []
    for row in report["probes"]:
        lines.append(f"{labels[row['status']]:<5} {row['name']}: {row['detail']}")
        if row["status"] in ("warn", "fail") and row["fix"]:
            lines.append(f"      fix: {row['fix']}")
    if report["scratch"]:
        lines.append(f"(probed in {report['scratch']})")
    choice, error = report["choice"], report["error"]
    if choice is not None:
        why = "; ".join(choice["reasons"])
        lines.append(f"builds will use: isolation={choice['isolation']}, backend={choice['backend']} ({why})")
        lines.extend(f"warning: {w}" for w in choice["warnings"])
    else:
        lines.append(f"builds cannot run RUN steps here: {error['message']}")
        if error["hint"]:
            lines.append(f"      fix: {error['hint']}")
    return "\n".join(lines) + "\n"


def cmd_doctor(args: argparse.Namespace) -> int:
    scratch = scratch_dir(args.state)
    from imgci.build.sandbox.probe import run_probes

    report = doctor_report(run_probes(scratch), args.isolation, args.backend, str(scratch))
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))
    return 0 if report["ok"] else 1
