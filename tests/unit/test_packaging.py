"""The GitHub Action, the runner image and the CI examples agree with each other and with entrypoint.py.

No network and no docker: the YAML is parsed, the Dockerfile goes through imgci's own frontend, and entrypoint.py
runs with a fake imgci.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from imgci.build.dockerfile import (
    CopyInstruction,
    EntrypointInstruction,
    Instruction,
    RunInstruction,
    UserInstruction,
    parse_dockerfile,
)
from imgci.build.dockerignore import Matcher, parse_dockerignore

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "examples" / "workflows"
ACTION_USES = "imgci/img-action@"
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)


from tests.unit.test_entrypoint import entrypoint  # noqa: E402  (entrypoint.py loaded once, by path)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def action() -> dict[str, Any]:
    return load(REPO / "action.yml")


def github_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("github-*.yml"))


def action_steps(workflow: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(job id, job, step) for every step that uses the imgci action."""
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith(ACTION_USES):
                yield job_id, job, step


# -- YAML and action.yml -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [REPO / "action.yml", *sorted(WORKFLOWS.glob("*.yml"))], ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    assert isinstance(load(path), dict)


def test_the_examples_are_all_there() -> None:
    names = {p.name for p in WORKFLOWS.iterdir()}
    assert {
        "github-single.yml",
        "github-sharded.yml",
        "github-actions-cache.yml",
        "imgci.gitlab-ci.yml",
        "gitlab-ci.yml",
        "README.md",
    } <= names


def test_action_is_a_docker_action_built_from_the_dockerfile(action: dict[str, Any]) -> None:
    assert action["runs"] == {"using": "docker", "image": "Dockerfile"}  # the Dockerfile's ENTRYPOINT runs
    assert action["name"] and action["description"]
    assert set(action["branding"]) == {"icon", "color"}


def test_action_declares_its_outputs(action: dict[str, Any]) -> None:
    assert set(action["outputs"]) == {"digest", "images", "metadata"}
    for name, output in action["outputs"].items():
        assert output["description"], name
        assert "value" not in output  # docker actions set outputs through $GITHUB_OUTPUT


def test_every_input_is_a_described_string(action: dict[str, Any]) -> None:
    for name, spec in action["inputs"].items():
        assert spec["description"], name
        assert isinstance(spec["default"], str), f"{name}: default must be a string"
        assert spec.get("required", False) is False, name


def test_entrypoint_knows_exactly_the_declared_inputs_and_their_defaults(action: dict[str, Any]) -> None:
    declared = {name: spec["default"] for name, spec in action["inputs"].items()}
    assert set(entrypoint.DEFAULTS) == set(declared)
    for name, default in declared.items():
        expected = "" if EXPRESSION.search(default) else default
        assert entrypoint.DEFAULTS[name] == expected, name


def test_action_expressions_refer_to_declared_inputs(action: dict[str, Any]) -> None:
    text = (REPO / "action.yml").read_text()
    used = {m.group(1) for expr in EXPRESSION.findall(text) for m in re.finditer(r"inputs\.([\w-]+)", expr)}
    assert used <= set(action["inputs"])


class RecordingEnv(dict[str, str]):
    """A mapping that remembers which keys were asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith(("INPUT_", "IMGCI_", "GITHUB_", "DOCKER_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "host-docker"))
    work = tmp_path / "work"
    (work / "elsewhere").mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def observe(values: Mapping[str, str]) -> tuple[Any, ...]:
    """Everything entrypoint.main hands to imgci for these inputs: argv, stdin, cwd and the token variable."""
    seen: list[tuple[Any, ...]] = []

    def runner(argv: list[str]) -> int:
        stdin = sys.stdin.read() if argv[0] == "login" else ""
        seen.append((tuple(argv), stdin, os.getcwd(), os.environ.get("IMGCI_GITHUB_TOKEN")))
        return 0

    env = RecordingEnv({"INPUT_" + name.upper(): value for name, value in values.items()})
    # imgci runs in this process, whoever runs the tests (choose_user has its own tests in test_entrypoint.py)
    assert entrypoint.main(env, argv_runner=runner, chooser=lambda _env: (entrypoint.CURRENT, "")) == 0
    asked = {key for key in env.asked if key.startswith("INPUT_")}
    readable = {key for name in entrypoint.DEFAULTS for key in entrypoint.input_env_keys(name)}
    assert asked <= readable
    return tuple(seen)


# A value other than the default for every input; with a login in the baseline, so that each one shows.
VARIANTS = {
    "config": "other.yaml",
    "targets": "app",
    "set": "app.tags=x",
    "push": "true",
    "keep-going": "true",
    "cache-from": "type=local,src=c",
    "cache-to": "type=local,dest=c",
    "registry": "quay.io",
    "username": "someone-else",
    "password": "another-password",
    "github-token": "another-token",
    "github-checks": "status",
    "pr-comment": "true",
    "isolation": "userns",
    "insecure-registries": "reg.local:5000",
    "working-directory": "elsewhere",
    "metadata-file": "m.json",
}


def test_every_declared_input_changes_what_imgci_gets(action: dict[str, Any], isolated: Path) -> None:
    assert set(VARIANTS) == set(action["inputs"])
    baseline_inputs = {
        name: "" if EXPRESSION.search(spec["default"]) else spec["default"] for name, spec in action["inputs"].items()
    }
    baseline_inputs.update(registry="ghcr.io", username="octo", password="pw", **{"github-token": "tok"})
    baseline = observe(baseline_inputs)
    assert [call[0][0] for call in baseline] == ["login", "run"]
    for name, value in VARIANTS.items():
        assert observe({**baseline_inputs, name: value}) != baseline, f"input {name} has no effect"


# -- workflows -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", github_workflows(), ids=lambda p: p.name)
def test_workflows_pass_only_declared_inputs(path: Path, action: dict[str, Any]) -> None:
    steps = list(action_steps(load(path)))
    assert steps, f"{path.name} does not use the action"
    for job_id, _job, step in steps:
        assert step["uses"] == "imgci/img-action@v1"
        unknown = set(step.get("with", {})) - set(action["inputs"])
        assert not unknown, f"{path.name} job {job_id}: unknown inputs {sorted(unknown)}"


@pytest.mark.parametrize("path", github_workflows(), ids=lambda p: p.name)
def test_workflows_use_only_outputs_that_exist(path: Path, action: dict[str, Any]) -> None:
    workflow = load(path)
    text = path.read_text()
    for job_id, job in workflow["jobs"].items():
        steps = {step["id"]: step for step in job.get("steps", []) if "id" in step}
        job_text = yaml.safe_dump(job)
        for step_id, output in re.findall(r"steps\.([\w-]+)\.outputs\.([\w-]+)", job_text):
            assert step_id in steps, f"{path.name} job {job_id}: no step {step_id}"
            if str(steps[step_id].get("uses", "")).startswith(ACTION_USES):
                assert output in action["outputs"], f"{path.name}: the action has no output {output}"
            else:  # a run step: it must write that output
                assert f"{output}=" in steps[step_id]["run"], f"{path.name}: step {step_id} never sets {output}"
    for job_id, output in re.findall(r"needs\.([\w-]+)\.outputs\.([\w-]+)", text):
        assert output in workflow["jobs"][job_id].get("outputs", {}), f"{path.name}: job {job_id} has no {output}"


def test_single_workflow_pushes_except_for_pull_requests_and_shows_the_digest() -> None:
    workflow = load(WORKFLOWS / "github-single.yml")
    ((_, job, step),) = action_steps(workflow)
    assert step["with"]["push"] == "${{ github.event_name != 'pull_request' }}"
    assert step["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    assert f"steps.{step['id']}.outputs.digest" in yaml.safe_dump(job)


def test_sharded_workflow_builds_one_matrix_entry_per_job() -> None:
    workflow = load(WORKFLOWS / "github-sharded.yml")
    plan, build = workflow["jobs"]["plan"], workflow["jobs"]["build"]
    assert "imgci plan build.yaml --format github-matrix" in yaml.safe_dump(plan)
    assert build["needs"] == "plan"
    assert build["strategy"] == {"matrix": "${{ fromJSON(needs.plan.outputs.matrix) }}", "fail-fast": False}
    ((_, _, step),) = action_steps(workflow)
    assert step["with"]["targets"] == "${{ matrix.only }}"
    assert step["with"]["cache-from"].startswith("type=registry,ref=ghcr.io/${{ github.repository }}:")
    assert step["with"]["cache-to"].endswith(",mode=max")


def test_actions_cache_workflow_saves_the_directory_the_action_exports() -> None:
    workflow = load(WORKFLOWS / "github-actions-cache.yml")
    (job,) = workflow["jobs"].values()
    cache = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache@"))
    ((_, _, step),) = action_steps(workflow)
    path = cache["with"]["path"]
    assert step["with"]["cache-from"] == f"type=local,src={path}"
    assert step["with"]["cache-to"].startswith(f"type=local,dest={path},")
    assert job["steps"].index(cache) < job["steps"].index(step)  # restored before the build
    assert cache["with"]["restore-keys"].strip() and cache["with"]["key"].startswith(
        cache["with"]["restore-keys"].strip()
    )


# -- GitLab --------------------------------------------------------------------------------------------------------
def gitlab_pipeline() -> tuple[dict[str, Any], dict[str, Any]]:
    """The example .gitlab-ci.yml with its local includes merged in (as GitLab does: the including file wins)."""
    own = load(WORKFLOWS / "gitlab-ci.yml")
    merged: dict[str, Any] = {}
    for include in own.get("include", []):
        assert set(include) == {"local"}, "the example must resolve without network"
        merged.update(load(REPO / include["local"]))
    variables = {**merged.get("variables", {}), **own.get("variables", {})}
    merged.update({k: v for k, v in own.items() if k != "include"}, variables=variables)
    return own, merged


def test_gitlab_extends_targets_exist() -> None:
    own, merged = gitlab_pipeline()
    extends = [job["extends"] for job in own.values() if isinstance(job, dict) and "extends" in job]
    assert ".imgci" in extends
    for target in extends:
        for name in [target] if isinstance(target, str) else target:
            assert name in merged, f"extends: {name} is not defined"


def test_gitlab_template_defines_every_imgci_variable_it_uses() -> None:
    template = load(WORKFLOWS / "imgci.gitlab-ci.yml")
    used = set(re.findall(r"\$\{?(IMGCI_\w+)", yaml.safe_dump({k: v for k, v in template.items() if k != "variables"})))
    assert used, "the template uses no IMGCI_ variables?"
    assert used <= set(template["variables"])
    assert {"IMGCI_IMAGE", "IMGCI_CONFIG", "IMGCI_ONLY", "IMGCI_ARGS"} <= set(template["variables"])


def test_gitlab_template_jobs() -> None:
    template = load(WORKFLOWS / "imgci.gitlab-ci.yml")
    jobs = {name: job for name, job in template.items() if isinstance(job, dict) and name != "variables"}
    assert set(jobs) == {".imgci", ".imgci-plan"}  # hidden: nothing runs until a job extends them
    job = jobs[".imgci"]
    assert job["image"] == {"name": "$IMGCI_IMAGE", "entrypoint": [""]}
    login = "\n".join(job["before_script"])
    assert '| imgci login "$CI_REGISTRY" -u "$CI_REGISTRY_USER" --password-stdin' in login
    assert " -p " not in login and "--password " not in login
    assert job["script"] == ['imgci run "$IMGCI_CONFIG" ${IMGCI_ONLY:+--only "$IMGCI_ONLY"} $IMGCI_ARGS']
    assert job["artifacts"]["reports"] == {"dotenv": "imgci.env"}
    assert set(job["artifacts"]["paths"]) == {"imgci-metadata.json", "imgci-summary.md"}
    assert job["artifacts"]["when"] == "always"
    assert job["cache"]["paths"] == [".imgci-cache/"]
    assert job["cache"]["key"] == "imgci-$CI_COMMIT_REF_SLUG"
    args = template["variables"]["IMGCI_ARGS"]
    assert "--cache-from type=local,src=.imgci-cache" in args and "--cache-to type=local,dest=.imgci-cache" in args
    plan = jobs[".imgci-plan"]
    assert plan["script"] == ['imgci plan "$IMGCI_CONFIG" --format gitlab > imgci-pipeline.yml']
    assert plan["artifacts"]["paths"] == ["imgci-pipeline.yml"]


def test_gitlab_deploy_reads_the_digest_from_the_build_job() -> None:
    own, merged = gitlab_pipeline()
    assert own["stages"] == ["build", "deploy"]
    build = own["build-images"]
    assert build == {"extends": ".imgci", "stage": "build"}
    deploy = own["deploy"]
    assert deploy["stage"] == "deploy" and deploy["needs"] == ["build-images"]
    assert any("$IMGCI_APP_DIGEST" in line for line in deploy["script"])
    assert merged[".imgci"]["artifacts"]["reports"]["dotenv"]  # where IMGCI_APP_DIGEST comes from


# -- the runner image ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> Any:
    return parse_dockerfile((REPO / "Dockerfile").read_text(), "Dockerfile")


def stage_instructions(dockerfile: Any, stage: Any) -> list[Instruction]:
    """A stage's instructions with those of the stages it is built FROM first (image config is inherited)."""
    parent = dockerfile.stage(stage.from_.image) if stage.from_.image != stage.name else None
    inherited = stage_instructions(dockerfile, parent) if parent is not None and parent.index < stage.index else []
    return [*inherited, *stage.instructions]


def effective_user(instructions: list[Instruction]) -> str:
    users = [i.user for i in instructions if isinstance(i, UserInstruction)]
    return users[-1] if users else "root"


def test_dockerfile_parses_with_imgcis_own_frontend(dockerfile: Any) -> None:
    assert dockerfile.stages[0].from_.image == "python:3.11-slim-bookworm"
    assert dockerfile.notes == []


def test_one_final_stage_that_starts_as_root_for_the_entrypoint_to_decide(dockerfile: Any) -> None:
    # A docker action runs the last stage and cannot pass --user: the image starts as root and entrypoint.py
    # switches to imgci when imgci can build (user namespaces with subuid ranges, writable workspace).
    # every stage but the last is only a step towards it (FROM or COPY --from of a later stage): no other target
    final = dockerfile.stages[-1]
    for stage in dockerfile.stages[:-1]:
        used = {later.from_.image for later in dockerfile.stages[stage.index + 1 :]}
        used |= {i.from_ for later in dockerfile.stages for i in later.instructions if isinstance(i, CopyInstruction)}
        assert {stage.name, str(stage.index)} & used, f"stage {stage.display_name} is a second final stage"
    assert effective_user(stage_instructions(dockerfile, final)) == "root"
    users = [i for i in final.instructions if isinstance(i, UserInstruction)]
    assert [u.user for u in users] == ["root"]  # stated, not inherited: the entrypoint relies on it


def test_the_entrypoint_is_entrypoint_py_in_exec_form(dockerfile: Any) -> None:
    (entry,) = [
        i for i in stage_instructions(dockerfile, dockerfile.stages[-1]) if isinstance(i, EntrypointInstruction)
    ]
    # exec form: a shell would drop the INPUT_KEEP-GOING-style variables GitHub passes
    assert entry.prepend_shell is False
    assert entry.args == ("python", "/opt/imgci/entrypoint.py")
    copies = [i for i in dockerfile.stages[-1].instructions if isinstance(i, CopyInstruction)]
    assert any(i.sources == ("entrypoint.py",) and i.dest == "/opt/imgci/entrypoint.py" for i in copies)


def test_the_user_the_entrypoint_switches_to_is_the_one_the_image_creates(dockerfile: Any) -> None:
    runs = "\n".join(" ".join(i.args) for i in dockerfile.stages[-1].instructions if isinstance(i, RunInstruction))
    assert entrypoint.DEFAULT_USER == "imgci"
    assert "useradd --uid 1001 --gid 1001 --create-home --shell /bin/sh imgci" in runs


def test_the_image_has_the_user_and_subordinate_ids_for_rootless_builds(dockerfile: Any) -> None:
    runs = "\n".join(" ".join(i.args) for i in dockerfile.stages[-1].instructions if isinstance(i, RunInstruction))
    assert "useradd --uid 1001" in runs
    assert 'echo "imgci:100000:65536" > /etc/subuid' in runs
    assert 'echo "imgci:100000:65536" > /etc/subgid' in runs
    assert "--no-install-recommends uidmap ca-certificates git" in runs
    assert "pip install --no-cache-dir /opt/imgci/src" in runs
    assert "chown -R imgci:imgci /home/imgci" in runs
    env = [i for i in dockerfile.stages[-1].instructions if i.keyword == "ENV"]
    assert ("IMGCI_STATE", "/home/imgci/.local/share/imgci") in [pair for i in env for pair in i.pairs]


def test_everything_the_dockerfile_copies_is_in_the_context(dockerfile: Any) -> None:
    matcher = Matcher(parse_dockerignore((REPO / ".dockerignore").read_text()))
    sources = [
        s
        for stage in dockerfile.stages
        for i in stage.instructions
        if isinstance(i, CopyInstruction)
        for s in i.sources
    ]
    assert {"pyproject.toml", "README.md", "imgci", "entrypoint.py"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert not matcher.matches(source), f"{source} is excluded by .dockerignore"
    assert not matcher.matches("imgci/cli.py")


def test_dockerignore_keeps_the_heavy_and_irrelevant_out() -> None:
    matcher = Matcher(parse_dockerignore((REPO / ".dockerignore").read_text()))
    for path in [".venv/bin/python", ".git/HEAD", "tests/unit/test_oci.py", "bench/x.py", ".imgci-demo/state"]:
        assert matcher.matches(path), path
    assert matcher.matches("imgci/__pycache__/cli.cpython-311.pyc")
