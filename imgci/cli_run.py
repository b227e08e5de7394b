"""``imgci run`` / ``python -m imgci build.yaml``, ``imgci plan`` and ``imgci schema``: the CI step's commands.

Contract: ``run`` loads and validates the whole build.yaml plan (every error located at its file and line, all
reported before anything starts), runs it (:class:`imgci.publish.runner.MatrixRun`), writes
``imgci-metadata.json``, prints the summary table, and hands the report to the CI reporter (GitHub Actions or
GitLab CI, detected from the environment unless ``--report`` says). Exit status: 0 when every entry succeeded,
1 when one failed, 2 for a plan that cannot run. ``plan`` prints the expanded matrix for sharding a run across CI
jobs; ``schema`` prints build.yaml's JSON Schema.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from imgci.errors import ImgciError

DEFAULT_CONFIG = "build.yaml"


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        help="Build, push and report every image of a build.yaml matrix (also: python -m imgci build.yaml).",
        description="Build every entry of a build.yaml matrix in one process (shared steps run once), push every "
        "tag with retries, export the cache and report (imgci-metadata.json, GitHub Actions, GitLab CI).",
        parents=[common],
    )
    p.set_defaults(handler=cmd_run)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"the build file (default {DEFAULT_CONFIG})")
    _selection(p)
    push = p.add_mutually_exclusive_group()
    push.add_argument("--push", dest="push", action="store_true", default=None, help="push every entry")
    push.add_argument("--no-push", dest="push", action="store_false", help="push nothing (build into the store)")
    p.add_argument("--keep-going", action="store_true", help="a failed entry does not cancel the others")
    p.add_argument("--dry-run", action="store_true", help="validate the plan and show it; build nothing")
    p.add_argument(
        "--no-skip-unchanged",
        dest="skip_unchanged",
        action="store_false",
        help="rebuild even when the registry already has an entry's image",
    )
    p.add_argument("--metadata-file", default="imgci-metadata.json", help="the run's JSON report (default %(default)s)")
    p.add_argument("--summary-file", help="markdown summary (default $GITHUB_STEP_SUMMARY; imgci-summary.md on GitLab)")
    p.add_argument("--dotenv-file", help="GitLab dotenv report of digests (default imgci.env on GitLab)")
    p.add_argument("--report", choices=["auto", "github", "gitlab", "none"], default="auto", help="CI reporting")
    p.add_argument("--github-token", help="token for check runs / PR comments (prefer env IMGCI_GITHUB_TOKEN)")
    p.add_argument("--github-checks", choices=["check-run", "status", "none"], default="check-run")
    p.add_argument("--pr-comment", action="store_true", help="post (and update in place) one PR comment")
    p.add_argument("--cache-from", action="append", default=[], metavar="SPEC", help="added to every entry")
    p.add_argument("--cache-to", action="append", default=[], metavar="SPEC", help="added to every entry")
    from imgci.cli_build import add_engine_flags

    add_engine_flags(p)
    p.add_argument("--jobs", type=int, default=0, metavar="N", help="entries built at once (default: all)")

    p = sub.add_parser(
        "plan",
        help="Show a build.yaml's matrix, e.g. to shard it across CI jobs.",
        description="Expand a build.yaml into its matrix entries; each CI job then runs `imgci run --only ID`.",
        parents=[common],
    )
    p.set_defaults(handler=cmd_plan)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    _selection(p)
    p.add_argument("--format", choices=["json", "github-matrix", "gitlab"], default="json")

    p = sub.add_parser("schema", help="Print build.yaml's JSON Schema (for editors).", parents=[common])
    p.set_defaults(handler=cmd_schema)


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="target, group or entry id (repeatable)")
    p.add_argument(
        "--set", action="append", default=[], metavar="TARGET.FIELD=VALUE", help="override a field (TARGET may be *)"
    )


def _load(args: argparse.Namespace) -> Any:
    from imgci.config import load_plan

    return load_plan(Path(args.config), only=args.only, sets=args.set, push=getattr(args, "push", None))


def cmd_schema(args: argparse.Namespace) -> int:
    from imgci.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from imgci.config import plan_document

    print(plan_document(_load(args), args.format, config_arg=args.config))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from imgci.cli import _LazyPool, _store
    from imgci.publish.ci import ReportOptions, make_reporter
    from imgci.publish.report import ErrorInfo, RunReport, write_metadata
    from imgci.publish.runner import MatrixRun, PlanError, RunOptions, error_info
    from imgci.publish.summary import table_text

    token = args.github_token or os.environ.get("IMGCI_GITHUB_TOKEN", "")
    options = ReportOptions(
        summary_file=Path(args.summary_file) if args.summary_file else None,
        dotenv_file=Path(args.dotenv_file) if args.dotenv_file else None,
        github_token=token,
        github_checks=args.github_checks,
        pr_comment=args.pr_comment,
    )
    reporter = make_reporter(args.report, sys.stdout, os.environ, options)
    metadata_file = Path(args.metadata_file)
    try:
        plan = _load(args)
    except ImgciError as e:
        report = RunReport(config=args.config, provider=reporter.provider, error=error_info(e, "config"))
        return _fail_early(report, e, reporter, metadata_file)
    run_options = RunOptions(
        keep_going=args.keep_going,
        dry_run=args.dry_run,
        cache_from=list(args.cache_from),
        cache_to=list(args.cache_to),
        isolation=args.isolation,
        backend=args.backend,
        compression=args.compression,
        jobs=max(0, args.jobs),
        skip_unchanged=args.skip_unchanged,
        progress=args.progress or "auto",
    )
    for entry in plan.entries:
        for note in entry.notes:
            print(f"note: {entry.label}: {note}", file=sys.stderr)
    store = _store(args)
    pool = _LazyPool(args)
    try:
        run = MatrixRun(
            plan,
            store=store,
            client_factory=pool,
            reporter=reporter,
            options=run_options,
            out=sys.stdout,
            err=sys.stderr,
        )
        try:
            runs = run.prepare()
        except PlanError as e:
            report = RunReport(config=args.config, provider=reporter.provider, ci=plan.ci.values())
            report.error = e.errors[0][1] if len(e.errors) == 1 else ErrorInfo(e.message, phase="config")
            for _, err in e.errors:
                reporter.annotate_error(err, title="imgci: invalid build")
            return _fail_early(report, e, reporter, metadata_file, annotated=True)
        report = run.run(runs)
    finally:
        pool.close()
    write_metadata(report, metadata_file)
    sys.stdout.write("\n" + table_text(report) + "\n")
    sys.stdout.flush()
    for note in reporter.finish(report):
        print(note, file=sys.stderr)
    print(f"metadata: {metadata_file}", file=sys.stderr)
    return 0 if report.ok else 1


def _fail_early(report: Any, e: ImgciError, reporter: Any, metadata_file: Path, *, annotated: bool = False) -> int:
    from imgci.publish.report import write_metadata

    if not annotated and report.error is not None:
        reporter.annotate_error(report.error, title="imgci: invalid build")
    write_metadata(report, metadata_file)
    for note in reporter.finish(report):
        print(note, file=sys.stderr)
    print(f"error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"hint: {e.hint}", file=sys.stderr)
    return 2


def implicit_run(argv: list[str], i: int | None, commands: Collection[str]) -> list[str]:
    """``python -m imgci build.yaml …`` means ``imgci run build.yaml …``: insert ``run`` before ``argv[i]``, the
    first positional argument (the command's place), when it is not a command and names a YAML file."""
    if i is None:
        return argv
    token = argv[i]
    if token not in commands and (token.endswith((".yaml", ".yml")) or Path(token).is_file()):
        return [*argv[:i], "run", *argv[i:]]
    return argv
