"""build.yaml as plain data plus the line of everything in it, and errors that point at that line.

Contract: :func:`load_yaml` (and :func:`load_yaml_file`, which also reads the file) parses with PyYAML's SafeLoader
and returns the document as dicts, lists and scalars, together with a :class:`Locator` that knows the 1-based line
of every mapping key and sequence item, addressed by its path (``("targets", "app", "tags", 1)``). Duplicate keys
are an error (YAML would silently keep the last); mapping keys are always strings (``3.11:`` stays ``"3.11"``); the
original text of every non-string scalar is kept (:meth:`Locator.raw`) so that ``3.10`` can become ``"3.10"``, not
``"3.1"``. Every problem is a :class:`ConfigError` formatted ``build.yaml:12: targets.app.tags[1]: <problem>``.

:func:`validation_error` turns a pydantic ``ValidationError`` into the :class:`ConfigError` of its first problem in
file order, at the line of the offending field, with a "did you mean" for misspelt field names. :func:`apply_set`
and :func:`stringify_scalars` prepare the raw document for validation (``--set`` overrides; ``3.10`` → "3.10").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from imgci.errors import UsageError

YamlPath = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Bounds on the document as plain data. Aliases are expanded into copies, so without a bound a few lines of
# "billion laughs" (lists of aliases of lists of aliases) take minutes and gigabytes; a real build.yaml has a few
# hundred values, nested a few levels.
MAX_VALUES = 100_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Location:
    """Where something was written: ``file`` (or ``--set``), 1-based ``line`` (0: unknown), dotted ``field``."""

    file: str
    line: int
    field: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}" if self.field else where


class ConfigError(UsageError):
    """A build.yaml (or ``--set``/``--only``) problem at ``file``:``line`` in ``field``; ``detail`` is the problem."""

    def __init__(self, problem: str, *, file: str, line: int = 0, field: str = "", hint: str | None = None) -> None:
        super().__init__(f"{Location(file, line, field)}: {problem}", hint=hint)
        self.file = file
        self.line = line
        self.field = field
        self.detail = problem

    @classmethod
    def at(cls, location: Location, problem: str, *, hint: str | None = None) -> ConfigError:
        return cls(problem, file=location.file, line=location.line, field=location.field, hint=hint)


def format_path(path: YamlPath) -> str:
    """``("targets", "app", "tags", 1)`` → ``targets.app.tags[1]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Locator:
    """Lines of the paths in one YAML document, plus locations that replaced them (``--set``)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[YamlPath, int] = {(): 1}
        self.raw_text: dict[YamlPath, str] = {}
        self.overrides: dict[YamlPath, Location] = {}

    def at(self, path: YamlPath) -> Location:
        """The location of ``path``: an override of it or of a parent, else the line of its nearest written parent."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.overrides:
                return self.overrides[path[:n]]
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return Location(self.file, self.lines[path[:n]], format_path(path))
        return Location(self.file, 0, format_path(path))

    def error(self, path: YamlPath, problem: str, *, hint: str | None = None) -> ConfigError:
        return ConfigError.at(self.at(path), problem, hint=hint)

    def raw(self, path: YamlPath) -> str | None:
        """The source text of the non-string scalar at ``path`` (``3.10``, ``true``), if there is one."""
        return self.raw_text.get(path)

    def override(self, path: YamlPath, location: Location) -> None:
        self.overrides[path] = location


def load_yaml_file(path: Path, name: str) -> tuple[dict[str, Any], Locator]:
    """The build.yaml at ``path`` (called ``name`` in messages) as a mapping; a target written as ``docs:`` alone
    becomes ``{}`` (all defaults)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=name, hint="create a build.yaml or pass its path") from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a build.yaml", file=name) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=name) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=name) from None
    data, locator = load_yaml(text, name)
    if data is None:
        raise ConfigError("the file is empty (expected version: 1 and targets:)", file=name, line=1)
    if not isinstance(data, dict):
        raise locator.error((), "expected a mapping with version, defaults, targets and groups")
    targets = data.get("targets")
    if isinstance(targets, dict):
        data["targets"] = {k: {} if v is None else v for k, v in targets.items()}
    return data, locator


def load_yaml(text: str, file: str) -> tuple[Any, Locator]:
    """Parse ``text`` (the contents of ``file``); see the module docstring."""
    locator = Locator(file)
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:  # the reader checks the whole text for control characters up front
        line = text.count("\n", 0, e.position) + 1
        problem = f"character U+{e.character:04X} is not allowed" if isinstance(e.character, int) else e.reason
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    try:
        node = loader.get_single_node()
        data = None if node is None else _Walker(loader, locator).value(node, ())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            problem = f"{e.problem} ({e.context})"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", file=file) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level, before the walker can count them
        raise ConfigError(f"invalid YAML: nested more than {MAX_DEPTH} levels deep", file=file) from None
    finally:
        loader.dispose()
    return data, locator


class _Walker:
    """Builds plain data from composed nodes, recording lines and raw scalar text in the locator."""

    def __init__(self, loader: yaml.SafeLoader, locator: Locator) -> None:
        self.loader = loader
        self.locator = locator
        self.active: set[int] = set()
        self.count = 0

    def value(self, node: Node, path: YamlPath) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.locator.error(path, f"more than {MAX_VALUES} values in the document (its aliases expanded)")
        if len(path) > MAX_DEPTH:
            raise self.locator.error(path, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ScalarNode):
            value = self.loader.construct_object(node)
            if not isinstance(value, str):
                self.locator.raw_text[path] = node.value
            return value
        if id(node) in self.active:
            raise self.locator.error(path, "a YAML alias refers to itself")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        raise self.locator.error(path, f"unsupported YAML node {node.tag}")

    def _sequence(self, node: SequenceNode, path: YamlPath) -> list[Any]:
        out = []
        for i, item in enumerate(node.value):
            self.locator.lines[(*path, i)] = item.start_mark.line + 1
            out.append(self.value(item, (*path, i)))
        return out

    def _mapping(self, node: MappingNode, path: YamlPath) -> dict[str, Any]:
        own = {id(k) for k, _ in node.value if k.tag != _MERGE_TAG}
        self.loader.flatten_mapping(node)  # `<<: *anchor` pairs first, then the mapping's own keys
        out: dict[str, Any] = {}
        own_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                raise ConfigError(
                    f"{format_path(path) or 'document'}: a mapping key must be a plain name",
                    file=self.locator.file,
                    line=line,
                )
            key = key_node.value
            if id(key_node) in own:
                if key in own_lines:
                    raise ConfigError(
                        f"duplicate key {key!r} (first written at line {own_lines[key]})",
                        file=self.locator.file,
                        line=line,
                        field=format_path((*path, key)),
                    )
                own_lines[key] = line
            self.locator.lines[(*path, key)] = line
            out[key] = self.value(value_node, (*path, key))
        return out


def validation_error(
    err: ValidationError, locator: Locator, known_fields: Callable[[YamlPath], Sequence[str]]
) -> ConfigError:
    """The first problem of ``err`` in file order. ``known_fields(parent)`` lists the names allowed in the mapping at
    ``parent`` (for "unknown field … did you mean …")."""
    problems = []
    for item in err.errors():
        path: YamlPath = tuple(p for p in item["loc"] if p != "[key]")
        problems.append((locator.at(path), path, item))
    problems.sort(key=lambda p: (p[2]["type"] == "missing", p[0].line))  # a misspelt field also makes one missing
    location, path, item = problems[0]
    if item["type"] == "extra_forbidden" and path and isinstance(path[-1], str):
        name = path[-1]
        return ConfigError.at(location, f"unknown field {name!r}{did_you_mean(name, known_fields(path[:-1]))}")
    return ConfigError.at(location, _describe(item))


def did_you_mean(word: str, choices: Sequence[str], *, or_list: bool = True) -> str:
    """`` (did you mean 'tags'?)``, else (``or_list``) `` (expected one of: …)``, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(choices)})" if choices and or_list else ""


_EXPECTED = {
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
}


def _describe(item: Any) -> str:
    kind = item["type"]
    if kind == "missing":
        return "required field missing"
    if kind in _EXPECTED:
        return f"{_EXPECTED[kind]}, got {_describe_value(item.get('input'))}"
    message = str(item["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


# --- preparing the raw data for validation -----------------------------------------------------------------------

MAP_FIELDS = ("args", "labels")
LIST_FIELDS = ("tags", "platforms", "secrets", "ssh", "cache_from", "cache_to", "outputs")
BOOL_FIELDS = ("push", "no_cache", "pull")
STR_FIELDS = ("context", "dockerfile", "dockerfile_inline", "target")
#: The fields a target and ``defaults`` share (a target adds ``inherits`` and ``matrix``).
BUILD_FIELDS = (*STR_FIELDS, *MAP_FIELDS, *LIST_FIELDS, *BOOL_FIELDS)
_SET_ALIASES = {"platform": "platforms", "output": "outputs"}
_SETTABLE = (*BUILD_FIELDS, "inherits")
_SET_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def apply_set(data: dict[str, Any], item: str, locator: Locator) -> None:
    """Apply one bake-style ``TARGET.FIELD=VALUE`` to the raw document: ``*`` is every target, ``args.KEY`` and
    ``labels.KEY`` set one key, list fields split on commas, booleans are true/false/1/0. The changed paths are
    located at ``--set: ITEM`` from then on."""
    where = Location("--set", 0, item)
    key, eq, value = item.partition("=")
    target, _, rest = key.partition(".")
    fname, _, subkey = rest.partition(".")
    fname = fname.replace("-", "_")
    fname = _SET_ALIASES.get(fname, fname)
    if not eq or not target or not fname:
        raise ConfigError.at(where, "expected TARGET.FIELD=VALUE (e.g. app.args.KEY=V or *.platforms=linux/amd64)")
    if fname not in _SETTABLE:
        raise ConfigError.at(where, f"unknown field {fname!r}{did_you_mean(fname, _SETTABLE)}")
    if fname in MAP_FIELDS and not subkey:
        raise ConfigError.at(where, f"{fname} takes a key: {target}.{fname}.KEY=VALUE")
    if subkey and fname not in MAP_FIELDS:
        raise ConfigError.at(where, f"{fname} takes no key (only args.KEY and labels.KEY do)")
    targets = data.get("targets")
    names = list(targets) if isinstance(targets, dict) else []
    if target != "*" and target not in names:
        raise ConfigError.at(where, f"unknown target {target!r}{did_you_mean(target, names)}")
    parsed = _set_value(fname, value, where)
    for name in names if target == "*" else [target]:
        section = targets[name] if isinstance(targets, dict) else None
        if not isinstance(section, dict):
            continue  # validation reports the malformed target
        if subkey:
            if not isinstance(section.get(fname), dict):
                section[fname] = {}
            section[fname][subkey] = parsed
            locator.override(("targets", name, fname, subkey), where)
        else:
            section[fname] = parsed
            locator.override(("targets", name, fname), where)


def _set_value(fname: str, value: str, where: Location) -> Any:
    if fname in BOOL_FIELDS:
        if value.lower() not in _SET_BOOLS:
            raise ConfigError.at(where, f"{fname} takes true, false, 1 or 0, not {value!r}")
        return _SET_BOOLS[value.lower()]
    if fname in (*LIST_FIELDS, "inherits"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def stringify_scalars(data: dict[str, Any], locator: Locator) -> None:
    """Numbers and booleans in args, labels and matrix values become their YAML text (``3.10`` stays "3.10")."""
    targets = data.get("targets")
    sections: list[tuple[YamlPath, Any]] = [(("defaults",), data.get("defaults"))]
    if isinstance(targets, dict):
        sections += [(("targets", name), section) for name, section in targets.items()]
    for base, section in sections:
        if not isinstance(section, dict):
            continue
        for fname in MAP_FIELDS:
            _stringify_values(section.get(fname), (*base, fname), locator)
        matrix = section.get("matrix")
        for key, values in matrix.items() if isinstance(matrix, dict) else ():
            if key in ("include", "exclude") and isinstance(values, list):
                for i, item in enumerate(values):
                    _stringify_values(item, (*base, "matrix", key, i), locator)
            else:
                _stringify_values(values, (*base, "matrix", key), locator)


def _stringify_values(container: Any, path: YamlPath, locator: Locator) -> None:
    if isinstance(container, list):
        keys: list[Any] = list(range(len(container)))
    elif isinstance(container, dict):
        keys = list(container)
    else:
        return
    for key in keys:
        value = container[key]
        if value is not None and not isinstance(value, str | list | dict):
            container[key] = locator.raw((*path, key)) or str(value)
