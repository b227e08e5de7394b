"""build.yaml: the targets to build, expanded into a :class:`Plan` of concrete entries (target and matrix).

Contract: :func:`load_plan` reads and validates the whole file before anything is built, and raises
:class:`ConfigError` (``build.yaml:12: targets.app.tags[1]: <problem>``) for anything wrong in it, including a
missing context directory or Dockerfile and a tag that is not a valid reference; it never leaks a traceback.
Resolution order for one target: ``defaults``, then its ``inherits`` in order (bake semantics: maps merge key-wise,
everything else replaces; ``matrix`` is never inherited), then its own fields, then ``--set`` overrides. The matrix
is expanded as GitHub Actions does (:mod:`imgci.configmatrix`); every string field then gets ``${{ matrix.NAME }}``
and ``{{name}}`` CI templates (:mod:`imgci.cimeta`) substituted. Entries keep file order, then matrix order.

:func:`plan_document` renders a plan for CI sharding (``imgci plan --format json|github-matrix|gitlab``) and
:func:`json_schema` describes the file for editors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from imgci import reference
from imgci.cimeta import CIMeta, detect
from imgci.configmatrix import (
    Inheritance,
    Layer,
    Substitution,
    entry_ids,
    entry_label,
    expand_groups,
    expand_matrix,
    select_ids,
)
from imgci.configyaml import (
    BUILD_FIELDS,
    ConfigError,
    Location,
    Locator,
    YamlPath,
    apply_set,
    load_yaml_file,
    stringify_scalars,
    validation_error,
)
from imgci.errors import InvalidReferenceError, PlatformError, UsageError
from imgci.oci import Platform

__all__ = ["CIMeta", "ConfigError", "Entry", "Location", "Plan", "json_schema", "load_plan", "plan_document"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MATRIX_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_GITHUB_MATRIX_MAX = 256
# Strings that YAML users may write as numbers or booleans: the loader turns those into their text before validation.
_Text = Annotated[str, WithJsonSchema({"type": ["string", "number", "boolean"]})]


class BuildFields(BaseModel):
    """The fields of a target that ``defaults`` can also set."""

    model_config = ConfigDict(extra="forbid", title="defaults")

    context: str = Field(default=".", description="Build context directory, relative to the directory of build.yaml.")
    dockerfile: str = Field(default="Dockerfile", description="Dockerfile path, relative to the context (as docker).")
    dockerfile_inline: str | None = Field(
        default=None, description="Dockerfile contents, instead of a dockerfile path."
    )
    target: str | None = Field(default=None, description="The Dockerfile stage to build (docker build --target).")
    args: dict[str, _Text] = Field(
        default_factory=dict, description="Build arguments (--build-arg); numbers and booleans become strings."
    )
    labels: dict[str, _Text] = Field(default_factory=dict, description="Image labels (--label).")
    tags: list[str] = Field(
        default_factory=list,
        description="Image references to tag (and push). A tag whose {{template}} is empty for this build is skipped.",
    )
    platforms: list[str] = Field(default_factory=list, description="Platforms such as linux/amd64; empty: the host's.")
    secrets: list[str] = Field(default_factory=list, description="buildx --secret specs, e.g. id=npm,env=NPM_TOKEN.")
    ssh: list[str] = Field(default_factory=list, description="buildx --ssh specs, e.g. default.")
    cache_from: list[str] = Field(default_factory=list, description="--cache-from specs, e.g. type=registry,ref=REF.")
    cache_to: list[str] = Field(
        default_factory=list, description="--cache-to specs, e.g. type=registry,ref=REF,mode=max."
    )
    push: bool = Field(default=False, description="Push the tags after building.")
    outputs: list[str] = Field(default_factory=list, description="--output specs, e.g. type=oci,dest=app.tar.")
    no_cache: bool = Field(default=False, description="Build every step again (--no-cache).")
    pull: bool = Field(default=False, description="Check the registry for newer base images (--pull).")

    @model_validator(mode="after")
    def _one_dockerfile(self) -> BuildFields:
        if {"dockerfile", "dockerfile_inline"} <= self.model_fields_set:
            raise ValueError("give either dockerfile or dockerfile_inline, not both")
        return self

    def written(self) -> dict[str, Any]:
        """The build fields this mapping wrote (not defaulted)."""
        return {f: getattr(self, f) for f in BUILD_FIELDS if f in self.model_fields_set}


class Matrix(BaseModel):
    """Matrix dimensions (name → list of values) plus include and exclude, as in GitHub Actions."""

    model_config = ConfigDict(extra="allow", title="matrix")
    __pydantic_extra__: dict[str, list[_Text]] = Field(init=False)

    include: list[dict[str, _Text]] = Field(
        default_factory=list,
        description="Entries to add, or to extend: an item that agrees with entries on their matrix keys adds its "
        "other keys to them.",
    )
    exclude: list[dict[str, _Text]] = Field(
        default_factory=list, description="Entries to remove: those matching every key of an item."
    )

    def dims(self) -> dict[str, list[str]]:
        return dict(self.__pydantic_extra__ or {})


class Target(BuildFields):
    """One image to build (several with a matrix)."""

    model_config = ConfigDict(extra="forbid", title="target")

    inherits: list[str] = Field(
        default_factory=list, description="Targets whose fields this one starts from, in order (as bake)."
    )
    matrix: Matrix | None = Field(
        default=None, description="Build once per combination; use ${{ matrix.NAME }} in strings."
    )


class BuildFile(BaseModel):
    """imgci build.yaml."""

    model_config = ConfigDict(extra="forbid", title="imgci build.yaml")

    version: int = Field(default=1, description="The file format version: 1.")
    defaults: BuildFields = Field(default_factory=BuildFields, description="Fields every target starts from.")
    targets: dict[str, Target] = Field(description="The images to build, by name.")
    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Named sets of targets and groups; `default` is built when no --only is given.",
    )

    @field_validator("version")
    @classmethod
    def _version_1(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"unsupported version {value} (this imgci reads version 1)")
        return value

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: dict[str, Target]) -> dict[str, Target]:
        if not value:
            raise ValueError("no targets defined")
        return value


@dataclass
class Entry:
    """One image to build: a target with one matrix combination, every template substituted, paths absolute.

    ``field_locations`` has every build field: where it was written (the target's own, else an inherited target's or
    ``defaults``), or the target's line for a field that was never written.
    """

    id: str
    target: str
    label: str
    matrix: dict[str, str]
    context: Path
    dockerfile: Path | None
    dockerfile_inline: str | None
    stage: str | None
    args: dict[str, str]
    labels: dict[str, str]
    tags: list[str]
    platforms: list[str]
    secrets: list[str]
    ssh: list[str]
    cache_from: list[str]
    cache_to: list[str]
    push: bool
    outputs: list[str]
    no_cache: bool
    pull: bool
    location: Location
    field_locations: dict[str, Location] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The selected entries of one build.yaml, in file order, with the CI metadata their templates used."""

    path: Path
    entries: list[Entry]
    ci: CIMeta
    groups: dict[str, list[str]]


def load_plan(
    path: Path,
    *,
    only: Sequence[str] = (),
    sets: Sequence[str] = (),
    push: bool | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Plan:
    """Load ``path`` (relative to ``cwd`` when given) and select ``only`` (targets, groups or entry ids; default: the
    ``default`` group, else every target). ``sets`` are bake-style ``TARGET.FIELD=VALUE`` overrides, ``push``
    overrides every entry's push, ``env`` is the environment for CI detection (default ``os.environ``)."""
    full = path if path.is_absolute() or cwd is None else cwd / path
    name = str(path)
    locator, model = _load_model(full, name, sets)
    groups = expand_groups(model.groups, model.targets, locator)
    ci = detect(env, full.absolute().parent)
    entries = _build_entries(model, locator, ci, full.absolute().parent, push)
    ids_by_target: dict[str, list[str]] = {}
    for entry in entries:
        ids_by_target.setdefault(entry.target, []).append(entry.id)
    wanted = select_ids(ids_by_target, groups, only)
    return Plan(path=full.absolute(), entries=[e for e in entries if e.id in wanted], ci=ci, groups=groups)


def _load_model(path: Path, name: str, sets: Sequence[str]) -> tuple[Locator, BuildFile]:
    data, locator = load_yaml_file(path, name)
    for item in sets:
        apply_set(data, item, locator)
    stringify_scalars(data, locator)
    try:
        model = BuildFile.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, locator, _known_fields) from None
    for kind, names in (("target", model.targets), ("group", model.groups)):
        for key in names:
            if not _NAME.match(key):
                raise locator.error((f"{kind}s", key), f"invalid {kind} name {key!r} (use letters, digits, . _ -)")
    return locator, model


def _known_fields(parent: YamlPath) -> list[str]:
    if parent == ():
        return list(BuildFile.model_fields)
    if parent == ("defaults",):
        return list(BuildFields.model_fields)
    if len(parent) == 2 and parent[0] == "targets":
        return list(Target.model_fields)
    return []


# --- entries -----------------------------------------------------------------------------------------------------


def _build_entries(model: BuildFile, locator: Locator, ci: CIMeta, base: Path, push: bool | None) -> list[Entry]:
    own = {name: Layer.of(target.written(), ("targets", name)) for name, target in model.targets.items()}
    inheritance = Inheritance(own, {name: target.inherits for name, target in model.targets.items()}, locator)
    defaults = Layer.of(model.defaults.written(), ("defaults",))
    taken = set(model.targets)
    ci_values = ci.values()
    entries: list[Entry] = []
    for name, target in model.targets.items():
        layer = defaults.under(inheritance.layer(name))
        combos, keys = _combos(name, target, locator)
        ids = [name] if target.matrix is None else entry_ids(name, combos, taken, locator, ("targets", name, "matrix"))
        taken.update(ids)
        for entry_id, combo in zip(ids, combos, strict=True):
            sub = Substitution(combo, keys, ci_values, locator)
            entries.append(_EntryBuilder(name, layer, sub, locator).build(entry_id, combo, base, push))
    return entries


def _combos(name: str, target: Target, locator: Locator) -> tuple[list[dict[str, str]], list[str]]:
    """The target's matrix combinations and every matrix key they use (``[{}]`` and ``[]`` without a matrix)."""
    if target.matrix is None:
        return [{}], []
    path: YamlPath = ("targets", name, "matrix")
    dims = target.matrix.dims()
    for key in dims:
        if not _MATRIX_KEY.match(key):
            raise locator.error((*path, key), f"invalid matrix key {key!r} (use letters, digits, _ and -)")
    combos = expand_matrix(dims, target.matrix.include, target.matrix.exclude, locator, path)
    keys = list(dict.fromkeys(k for combo in combos for k in combo))
    return combos, keys


class _EntryBuilder:
    """Substitutes and checks the fields of one target for one matrix combination."""

    def __init__(self, name: str, layer: Layer, sub: Substitution, locator: Locator) -> None:
        self.name = name
        self.layer = layer
        self.values = layer.values
        self.sub = sub
        self.locator = locator

    def path(self, fname: str, *rest: str | int) -> YamlPath:
        return (*self.layer.paths.get(fname, ("targets", self.name, fname)), *rest)

    def build(self, entry_id: str, combo: dict[str, str], base: Path, push: bool | None) -> Entry:
        context = self._context(base)
        inline = self.values.get("dockerfile_inline")
        tags, notes = self._tags()
        entry = Entry(
            id=entry_id,
            target=self.name,
            label=entry_label(self.name, combo),
            matrix=dict(combo),
            context=context,
            dockerfile=None if inline is not None else self._dockerfile(context),
            dockerfile_inline=None if inline is None else self.sub.text(inline, self.path("dockerfile_inline")),
            stage=self._optional_text("target"),
            args=self._map("args"),
            labels=self._map("labels"),
            tags=tags,
            platforms=self._platforms(),
            secrets=self._list("secrets"),
            ssh=self._list("ssh"),
            cache_from=self._cache("cache_from"),
            cache_to=self._cache("cache_to"),
            push=bool(self.values.get("push", False)) if push is None else push,
            outputs=self._list("outputs"),
            no_cache=bool(self.values.get("no_cache", False)),
            pull=bool(self.values.get("pull", False)),
            location=self.locator.at(("targets", self.name)),
            field_locations={f: self.locator.at(self.path(f)) for f in BUILD_FIELDS},
            notes=notes,
        )
        if entry.push and not entry.tags:
            skipped = f" (every tag was skipped: {'; '.join(notes)})" if notes else ""
            raise self.locator.error(
                ("targets", self.name),
                f"push is true but there are no tags to push{skipped}",
                hint="add tags, or pass --push=false / --set NAME.push=false",
            )
        return entry

    def _optional_text(self, fname: str) -> str | None:
        value = self.values.get(fname)
        return None if value is None else self.sub.text(value, self.path(fname))

    def _context(self, base: Path) -> Path:
        text = self.sub.text(self.values.get("context", "."), self.path("context"))
        context = (base / text).resolve()
        if not context.is_dir():
            raise self.locator.error(self.path("context"), f"build context {text!r} is not a directory ({context})")
        return context

    def _dockerfile(self, context: Path) -> Path:
        text = self.sub.text(self.values.get("dockerfile", "Dockerfile"), self.path("dockerfile"))
        dockerfile = context / text  # an absolute `text` stays absolute
        if not dockerfile.is_file():
            raise self.locator.error(self.path("dockerfile"), f"Dockerfile {text!r} not found ({dockerfile})")
        return dockerfile

    def _map(self, fname: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.values.get(fname, {}).items():
            path = self.layer.key_paths[fname][key]
            out[self.sub.text(key, path)] = self.sub.text(value, path)
        return out

    def _list(self, fname: str, *, ref_safe: bool = False) -> list[str]:
        items = self.values.get(fname, [])
        return [self.sub.text(v, self.path(fname, i), ref_safe=ref_safe) for i, v in enumerate(items)]

    def _platforms(self) -> list[str]:
        out = self._list("platforms")
        for i, text in enumerate(out):
            try:
                Platform.parse(text)
            except PlatformError as e:
                raise self.locator.error(self.path("platforms", i), e.message) from None
        return out

    def _cache(self, fname: str) -> list[str]:
        from imgci.cache.backends.spec import parse_cache_from, parse_cache_to  # imported when a plan has caches

        parse = parse_cache_from if fname == "cache_from" else parse_cache_to
        out = self._list(fname, ref_safe=True)
        for i, text in enumerate(out):
            try:
                parse(text)
            except UsageError as e:
                raise self.locator.error(self.path(fname, i), e.message) from None
        return out

    def _tags(self) -> tuple[list[str], list[str]]:
        tags: list[str] = []
        notes: list[str] = []
        for i, template in enumerate(self.values.get("tags", [])):
            path = self.path("tags", i)
            text, note = self.sub.tag(template, path)
            if text is None:
                notes.append(note)
                continue
            try:
                ref = reference.parse(text)
            except InvalidReferenceError as e:
                raise self.locator.error(path, e.message) from None
            if ref.digest is not None:
                raise self.locator.error(path, f"a tag cannot name a digest: {text!r}")
            if str(ref) not in tags:
                tags.append(str(ref))
        return tags, notes


# --- documents ---------------------------------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The JSON schema of build.yaml (for editors: ``# yaml-language-server: $schema=…``)."""
    schema = BuildFile.model_json_schema()
    schema["title"] = "imgci build.yaml"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def plan_document(plan: Plan, fmt: str, *, config_arg: str) -> str:
    """The plan as ``json``, ``github-matrix`` (a ``strategy.matrix``) or ``gitlab`` (a child pipeline), without a
    trailing newline (the CLI prints it)."""
    if fmt == "json":
        entries = [_json_entry(e) for e in plan.entries]
        return json.dumps({"config": config_arg, "entries": entries}, indent=2)
    if fmt == "github-matrix":
        if len(plan.entries) > _GITHUB_MATRIX_MAX:
            raise UsageError(
                f"{len(plan.entries)} entries: GitHub runs at most {_GITHUB_MATRIX_MAX} jobs a matrix",
                hint="split the plan with --only (one plan job per group)",
            )
        include = [{"id": e.id, "target": e.target, "label": e.label, "only": e.id} for e in plan.entries]
        return json.dumps({"include": include}, separators=(",", ":"))
    if fmt == "gitlab":
        jobs = {f"imgci: {e.id}": _gitlab_job(e, config_arg) for e in plan.entries}
        return yaml.safe_dump(jobs, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")
    raise UsageError(f"unknown plan format {fmt!r} (expected json, github-matrix or gitlab)")


def _json_entry(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "target": entry.target,
        "label": entry.label,
        "matrix": entry.matrix,
        "tags": entry.tags,
        "platforms": entry.platforms,
        "push": entry.push,
        "context": str(entry.context),
        "dockerfile": None if entry.dockerfile is None else str(entry.dockerfile),
    }


_GITLAB_LOGIN = (
    'if [ -n "${CI_REGISTRY_PASSWORD:-}" ]; then printf \'%s\\n\' "$CI_REGISTRY_PASSWORD" | '
    'python -m imgci login "$CI_REGISTRY" -u "$CI_REGISTRY_USER" --password-stdin; fi'
)


def _gitlab_job(entry: Entry, config_arg: str) -> dict[str, Any]:
    """A self-contained child-pipeline job: the same login, per-entry cache and artifacts as the include
    template's ``.imgci`` job (a child pipeline cannot rely on the parent's includes)."""
    return {
        "image": {"name": "$IMGCI_IMAGE", "entrypoint": [""]},
        "variables": {"IMGCI_ONLY": entry.id},
        "before_script": [_GITLAB_LOGIN],
        "script": [f"python -m imgci run {_shell_word(config_arg)} --only {_shell_word(entry.id)} $IMGCI_ARGS"],
        "cache": {"key": f"imgci-{entry.id}-$CI_COMMIT_REF_SLUG", "paths": [".imgci-cache/"]},
        "artifacts": {
            "reports": {"dotenv": "imgci.env"},
            "paths": ["imgci-metadata.json", "imgci-summary.md"],
            "when": "always",
        },
    }


def _shell_word(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_./@%+=:,-]+", text) else "'" + text.replace("'", "'\"'\"'") + "'"
