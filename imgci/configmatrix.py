"""build.yaml's expansions: matrix, ``inherits``, groups, ``${{ matrix.NAME }}`` and ``{{name}}`` templates, ids.

Contract:

- :func:`expand_matrix` is GitHub Actions' algorithm: the cartesian product of the dimensions in key order, minus
  every combination that matches all keys of an ``exclude`` item, then each ``include`` item either extends every
  original combination whose matrix keys it agrees with, or (when it agrees with none) is added as a new one.
  Nothing left is an error at the matrix.
- :class:`Substitution` replaces ``${{ matrix.NAME }}`` first, then ``{{name}}`` CI templates (a ``${{`` is never
  read as a ``{{`` template). Unknown names are errors at the line of the string. In :meth:`Substitution.tag`, branch
  and tag names are sanitised into tag characters, and a template whose value is empty drops the tag with a note.
- :class:`Inheritance` resolves bake's ``inherits`` over :class:`Layer` s (maps merge key-wise, the rest replaces;
  a cycle is an error naming the chain) and :func:`expand_groups` flattens nested groups.
- :func:`entry_ids` names entries ``target-value-value`` (``app-3.11``), or ``target-key-value`` when that is
  ambiguous, always in ``[A-Za-z0-9._-]``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgci.configyaml import ConfigError, Locator, YamlPath, did_you_mean

# The most combinations a matrix may have before include/exclude (GitHub runs at most 256 jobs a matrix; one imgci run
# may build more, but a few lines of dimensions must not expand into millions of entries).
MAX_COMBINATIONS = 4096
_MATRIX_REF = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_MATRIX_EXPR = re.compile(r"^matrix\.([A-Za-z0-9_-]+)$")
_TEMPLATE = re.compile(r"(?<!\$)\{\{\s*(.*?)\s*\}\}")
_NOT_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
#: CI values that are git ref names (free text) and need sanitising where they become part of a tag.
REF_VALUES = frozenset({"branch", "tag", "ref_name", "default_branch", "version"})
_EMPTY_WHY = {
    "tag": "this build is not for a git tag",
    "pr": "this build is not for a pull request",
    "latest": "this build is not for the default branch",
    "branch": "this build is not for a branch",
    "version": "this build is not for a semver git tag",
    "major": "this build is not for a semver release tag",
    "minor": "this build is not for a semver release tag",
    "patch": "this build is not for a semver release tag",
}


def expand_matrix(
    dims: Mapping[str, Sequence[str]],
    include: Sequence[Mapping[str, str]],
    exclude: Sequence[Mapping[str, str]],
    locator: Locator,
    path: YamlPath,
) -> list[dict[str, str]]:
    """The matrix combinations (see the module docstring); ``path`` is the matrix's path in build.yaml."""
    _check_items(dims, include, "include", locator, path, need_known=False)
    _check_items(dims, exclude, "exclude", locator, path, need_known=True)
    keys = list(dims)
    if keys and (count := math.prod(len(values) for values in dims.values())) > MAX_COMBINATIONS:
        raise locator.error(path, f"the matrix has {count} combinations, more than {MAX_COMBINATIONS}")
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*dims.values())] if keys else []
    combos = [c for c in combos if not any(all(c[k] == v for k, v in ex.items()) for ex in exclude)]
    added: list[dict[str, str]] = []
    for item in include:
        matching = [c for c in combos if all(c[k] == v for k, v in item.items() if k in dims)]
        for combo in matching:
            combo.update({k: v for k, v in item.items() if k not in dims})
        if not matching:
            added.append(dict(item))
    result = combos + added
    if not result:
        raise locator.error(path, "the matrix has no entries (every combination is excluded, or a list is empty)")
    return result


def _check_items(
    dims: Mapping[str, Sequence[str]],
    items: Sequence[Mapping[str, str]],
    kind: str,
    locator: Locator,
    path: YamlPath,
    *,
    need_known: bool,
) -> None:
    for i, item in enumerate(items):
        if not item:
            raise locator.error((*path, kind, i), f"an {kind} item must name at least one matrix key")
        for key in item:
            if need_known and key not in dims:
                problem = f"{key!r} is not a matrix key{did_you_mean(key, list(dims))}"
                raise locator.error((*path, kind, i, key), problem)


def sanitise_tag(value: str) -> str:
    """A git ref name as a valid tag: other characters become ``-``, no leading ``.``/``-``, at most 128 characters."""
    return _NOT_TAG_CHARS.sub("-", value).lstrip(".-")[:128]


class Substitution:
    """Substitutes one matrix entry's values and the CI values into the strings of one target."""

    def __init__(
        self, matrix: Mapping[str, str], matrix_keys: Sequence[str], ci: Mapping[str, str], locator: Locator
    ) -> None:
        self.matrix = matrix
        self.matrix_keys = list(matrix_keys)
        self.ci = ci
        self.locator = locator

    def text(self, text: str, path: YamlPath, *, ref_safe: bool = False) -> str:
        """``text`` with both kinds of substitution; ``ref_safe`` sanitises ref-name values as in tags."""
        expanded = self._matrix(text, path)
        names = self._templates(expanded, path)
        return _TEMPLATE.sub(lambda m: self._value(names[m.start()], ref_safe=ref_safe), expanded)

    def tag(self, text: str, path: YamlPath) -> tuple[str | None, str]:
        """``(tag, "")``, or ``(None, note)`` when a template the tag uses is empty for this build."""
        expanded = self._matrix(text, path)
        names = self._templates(expanded, path)
        for name in names.values():
            if not self._value(name, ref_safe=True):
                why = _EMPTY_WHY.get(name, "it is empty for this build")
                return None, f"tag {text!r} skipped: {{{{{name}}}}} is empty ({why})"
        return _TEMPLATE.sub(lambda m: self._value(names[m.start()], ref_safe=True), expanded), ""

    def _matrix(self, text: str, path: YamlPath) -> str:
        def replace(m: re.Match[str]) -> str:
            found = _MATRIX_EXPR.match(m.group(1))
            if found is None:
                problem = f"unsupported expression {m.group(0)!r}: only ${{{{ matrix.NAME }}}} is substituted"
                raise self.locator.error(path, problem)
            name = found.group(1)
            if name not in self.matrix_keys:
                raise self.locator.error(path, self._unknown_matrix(name))
            return self.matrix.get(name, "")  # a key only some include-added entries have is empty elsewhere

        return _MATRIX_REF.sub(replace, text)

    def _unknown_matrix(self, name: str) -> str:
        if not self.matrix_keys:
            return f"unknown matrix variable {name!r}: this target has no matrix"
        return f"unknown matrix variable {name!r}{did_you_mean(name, self.matrix_keys)}"

    def _templates(self, text: str, path: YamlPath) -> dict[int, str]:
        """The template names in ``text`` by their offset; an unknown name is an error."""
        names: dict[int, str] = {}
        for m in _TEMPLATE.finditer(text):
            name = m.group(1)
            if name not in self.ci:
                problem = f"unknown template variable {{{{{name}}}}}{did_you_mean(name, list(self.ci))}"
                raise self.locator.error(path, problem)
            names[m.start()] = name
        return names

    def _value(self, name: str, *, ref_safe: bool) -> str:
        value = self.ci[name]
        return sanitise_tag(value) if ref_safe and name in REF_VALUES else value


def entry_ids(
    target: str, combos: Sequence[Mapping[str, str]], taken: set[str], locator: Locator, path: YamlPath
) -> list[str]:
    """Ids for the entries of one matrix target that collide neither with each other nor with ``taken``."""
    for with_keys in (False, True):
        ids = [_entry_id(target, combo, with_keys=with_keys) for combo in combos]
        if len(set(ids)) == len(ids) and not taken.intersection(ids):
            return ids
    clash = next(i for i in ids if ids.count(i) > 1 or i in taken)
    raise locator.error(path, f"two matrix entries (or a target and an entry) would both be named {clash!r}")


def _entry_id(target: str, combo: Mapping[str, str], *, with_keys: bool) -> str:
    parts = [target]
    for key, value in combo.items():
        if with_keys:
            parts.append(key)
        parts.append(_NOT_ID_CHARS.sub("-", value).strip("-"))
    return "-".join(p for p in parts if p)


def entry_label(target: str, combo: Mapping[str, str]) -> str:
    """``app`` or ``app (python=3.11, os=linux)``."""
    if not combo:
        return target
    return f"{target} ({', '.join(f'{k}={v}' for k, v in combo.items())})"


# --- inherits and groups -----------------------------------------------------------------------------------------

MAP_FIELD_NAMES = ("args", "labels")


@dataclass
class Layer:
    """Fields written in one place (or merged from several), with the path each field and map key was written at."""

    values: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, YamlPath] = field(default_factory=dict)
    key_paths: dict[str, dict[str, YamlPath]] = field(default_factory=dict)

    @classmethod
    def of(cls, written: Mapping[str, Any], base: YamlPath) -> Layer:
        """The fields ``written`` in the mapping at ``base``."""
        layer = cls()
        for fname, value in written.items():
            layer.values[fname] = dict(value) if fname in MAP_FIELD_NAMES else value
            layer.paths[fname] = (*base, fname)
            if fname in MAP_FIELD_NAMES:
                layer.key_paths[fname] = {k: (*base, fname, k) for k in value}
        return layer

    def under(self, upper: Layer) -> Layer:
        """This layer overridden by ``upper``: maps merge key-wise, everything else replaces."""
        out = Layer(dict(self.values), dict(self.paths), {k: dict(v) for k, v in self.key_paths.items()})
        for fname, value in upper.values.items():
            if fname in MAP_FIELD_NAMES:
                out.values[fname] = {**out.values.get(fname, {}), **value}
                out.key_paths[fname] = {**out.key_paths.get(fname, {}), **upper.key_paths[fname]}
            else:
                out.values[fname] = value
            out.paths[fname] = upper.paths[fname]
        for one, other in (("dockerfile", "dockerfile_inline"), ("dockerfile_inline", "dockerfile")):
            if one in upper.values and other not in upper.values:  # the more specific choice of the two wins
                out.values.pop(other, None)
                out.paths.pop(other, None)
        return out


class Inheritance:
    """Resolves bake's ``inherits`` (in order, then the target's own fields), memoised; a cycle names the chain."""

    def __init__(self, own: Mapping[str, Layer], inherits: Mapping[str, Sequence[str]], locator: Locator) -> None:
        self.own = own
        self.inherits = inherits
        self.locator = locator
        self.done: dict[str, Layer] = {}

    def layer(self, name: str, chain: tuple[str, ...] = ()) -> Layer:
        if name in self.done:
            return self.done[name]
        chain = (*chain, name)
        result = Layer()
        for i, parent in enumerate(self.inherits.get(name, ())):
            path = ("targets", name, "inherits", i)
            if parent not in self.own:
                raise self.locator.error(path, f"unknown target {parent!r}{did_you_mean(parent, list(self.own))}")
            if parent in chain:
                cycle = " -> ".join((*chain[chain.index(parent) :], parent))
                raise self.locator.error(path, f"inherits cycle: {cycle}")
            result = result.under(self.layer(parent, chain))
        self.done[name] = result.under(self.own[name])
        return self.done[name]


def expand_groups(
    groups: Mapping[str, Sequence[str]], targets: Collection[str], locator: Locator
) -> dict[str, list[str]]:
    """Each group as target names: nested groups flattened, first occurrence kept; unknown names and cycles are
    errors at the member's line."""
    for group in groups:
        if group in targets:
            raise locator.error(("groups", group), f"group {group!r} has the same name as a target")

    def expand(group: str, chain: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        for i, member in enumerate(groups[group]):
            if member in targets:
                names = [member]
            elif member in chain:
                raise locator.error(("groups", group, i), f"group cycle: {' -> '.join((*chain, member))}")
            elif member in groups:
                names = expand(member, (*chain, member))
            else:
                problem = f"unknown target or group {member!r}{did_you_mean(member, [*targets, *groups])}"
                raise locator.error(("groups", group, i), problem)
            out.extend(n for n in names if n not in out)
        return out

    return {group: expand(group, (group,)) for group in groups}


def select_ids(
    ids_by_target: Mapping[str, Sequence[str]], groups: Mapping[str, Sequence[str]], only: Sequence[str]
) -> set[str]:
    """The entry ids ``--only`` names: each item may be comma-separated, each name a group, a target or an entry id.
    Nothing named: the ``default`` group if there is one, else everything. An unknown name lists the known ones."""
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    if not names and "default" not in groups:
        return {i for ids in ids_by_target.values() for i in ids}
    all_ids = [i for ids in ids_by_target.values() for i in ids]
    wanted: set[str] = set()
    for name in names or ["default"]:
        if name in groups:
            wanted.update(i for target in groups[name] for i in ids_by_target[target])
        elif name in ids_by_target:
            wanted.update(ids_by_target[name])
        elif name in all_ids:
            wanted.add(name)
        else:
            known = f"targets: {', '.join(ids_by_target)}; groups: {', '.join(groups) or '-'}; entries: "
            close = did_you_mean(name, [*ids_by_target, *groups, *all_ids], or_list=False)
            problem = f"unknown target, group or entry{close}"
            raise ConfigError(f"{problem} ({known}{', '.join(all_ids)})", file="--only", field=name)
    return wanted
