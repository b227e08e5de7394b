"""Why a step missed the cache, in one line, found by comparing it with the closest previous record.

Contract: :func:`explain` compares a missing step's instruction and inputs with the records under the same parent
(the closest: fewest differing inputs) and names the difference the way a user thinks of it — ``COPY src/ changed:
src/app.py``, ``ARG VERSION: 1.2 → 1.3``, ``instruction changed`` — or says why there is nothing to compare with:
``parent step missed``, ``base image digest changed: … → …``, ``first build of this step``.
"""

from __future__ import annotations

from typing import Any

from imgci.cache.records import CacheRecord

_MAX_NAMES = 3


def _keyword(instruction: str) -> str:
    return instruction.split(" ", 1)[0].upper() if instruction else "STEP"


def _public(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if not k.startswith("_")}


def _distance(a: dict[str, Any], b: dict[str, Any]) -> int:
    keys = set(a) | set(b)
    return sum(1 for k in keys if a.get(k) != b.get(k))


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f" (+{len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")


def _args(old: list[str], new: list[str]) -> list[str]:
    o = dict(a.partition("=")[::2] for a in old)
    n = dict(a.partition("=")[::2] for a in new)
    out = []
    for name in sorted(set(o) | set(n)):
        if o.get(name) != n.get(name):
            out.append(f"ARG {name}: {o.get(name, '(unset)')} → {n.get(name, '(unset)')}")
    return out


def _files(keyword: str, old: dict[str, str], new: dict[str, str]) -> str:
    changed = sorted(p for p in new if p in old and old[p] != new[p])
    added = sorted(p for p in new if p not in old)
    removed = sorted(p for p in old if p not in new)
    parts = []
    if changed:
        parts.append(f"changed: {_names(changed)}")
    if added:
        parts.append(f"added: {_names(added)}")
    if removed:
        parts.append(f"removed: {_names(removed)}")
    return f"{keyword} sources " + ("; ".join(parts) if parts else "changed")


def explain(
    instruction: str,
    inputs: dict[str, Any],
    siblings: list[CacheRecord],
    *,
    parent_missed: bool = False,
    base_change: str = "",
) -> str:
    """The reason for a miss (see the module contract)."""
    if not siblings:
        if base_change:
            return base_change
        return "parent step missed" if parent_missed else "first build of this step"
    keyword = _keyword(instruction)
    siblings = [r for r in siblings if _keyword(r.instruction) == keyword]  # another Dockerfile's step says nothing
    if not siblings:
        return base_change or ("parent step missed" if parent_missed else "first build of this step")
    mine = _public(inputs)
    best = min(siblings, key=lambda r: (r.instruction != instruction, _distance(_public(r.inputs), mine)))
    theirs = _public(best.inputs)
    reasons: list[str] = []
    if best.instruction != instruction:
        if keyword == "ARG":
            return "; ".join(_args(best.instruction.split()[1:], instruction.split()[1:])) or "ARG changed"
        return f"instruction changed: {best.instruction!r} → {instruction!r}"
    for key in sorted(set(mine) | set(theirs)):
        old, new = theirs.get(key), mine.get(key)
        if old == new:
            continue
        if key == "instruction":
            if keyword == "ARG" and isinstance(old, str) and isinstance(new, str):
                reasons.extend(_args(old.split()[1:], new.split()[1:]) or [f"{old!r} → {new!r}"])
            elif best.instruction == instruction:
                reasons.append(f"{old!r} → {new!r}")
            continue
        if key == "args" and isinstance(old, list) and isinstance(new, list):
            reasons.extend(_args(old, new) or ["build args changed"])
        elif key == "sources":
            reasons.append(_files(keyword, dict(best.inputs.get("_files") or {}), dict(inputs.get("_files") or {})))
        elif key == "remote" and isinstance(old, dict) and isinstance(new, dict):
            changed = sorted(src for src in set(old) | set(new) if old.get(src) != new.get(src))
            reasons.append(f"{keyword} remote source changed: {_names(changed)}")
        elif key == "from":
            reasons.append(f"{keyword} --from source changed")
        elif key == "mounts":
            reasons.append("RUN --mount sources or options changed")
        else:
            reasons.append(f"{key} changed")
    return "; ".join(reasons) if reasons else "inputs changed"
