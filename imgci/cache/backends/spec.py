"""``--cache-from`` / ``--cache-to`` values, parsed as buildx spells them (CSV ``key=value`` fields).

Contract: :func:`parse_cache_from` and :func:`parse_cache_to` return a :class:`CacheSpec` or raise a
:class:`UsageError` that names the flag and the offending field, and suggests the closest valid spelling
(``--cache-to: unknown type 'regsitry' (did you mean registry?)``). Nothing is contacted or created here.

Accepted (anything else is refused):

- ``--cache-from REF`` and ``--cache-to REF`` mean ``type=registry,ref=REF`` (as in buildx)
- ``--cache-from type=registry,ref=REF``, ``type=local,src=DIR``
- ``--cache-to type=registry,ref=REF[,mode=min|max][,compression=gzip|zstd|uncompressed][,compression-level=N]
  [,force-compression=BOOL][,image-manifest=BOOL][,oci-mediatypes=BOOL][,ignore-error=BOOL]``
- ``--cache-to type=local,dest=DIR[,mode=…][,max-size=SIZE][,compression=…][,ignore-error=BOOL]``
- ``--cache-to type=inline`` (the records of the final image's chain in its config; the builder writes them)

Defaults: ``mode=min`` (as buildx) and ``ignore-error=true`` (buildx says false): a cache is best effort
(STYLE.md rule 8), so an export failure is a warning unless ``ignore-error=false`` asks for a failed build.
Sizes take ``k``/``m``/``g``/``t`` suffixes (binary, optionally followed by ``b`` or ``ib``), as docker does.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from imgci.errors import UsageError

_TYPES = ("registry", "local", "inline")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_COMPRESSIONS = ("gzip", "zstd", "uncompressed")
_FROM_KEYS = {"registry": ("ref",), "local": ("src",)}
_TO_COMMON = ("mode", "compression", "compression-level", "force-compression", "ignore-error")
_TO_KEYS = {
    "registry": ("ref", *_TO_COMMON, "image-manifest", "oci-mediatypes"),
    "local": ("dest", "max-size", *_TO_COMMON),
    "inline": ("ignore-error",),
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class CacheSpec:
    """One ``--cache-from``/``--cache-to`` value. ``location`` is the ref (registry) or the directory (local)."""

    type: str  # registry | local | inline
    location: str = ""
    mode: str = "min"  # min | max (exports only)
    compression: str = "gzip"  # exports only; layers are exported as built (see the report in the backends)
    ignore_error: bool = True  # exports only: a failure is a warning (True) or fails the build (False)
    max_size: int | None = None  # local exports: evict least recently used records above this many bytes
    raw: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # accepted buildx fields with no effect here

    def describe(self) -> str:
        if self.type == "registry":
            return self.location
        if self.type == "local":
            return f"local:{self.location}"
        return "inline"


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (expected one of: {', '.join(choices)})"


def _fields(flag: str, text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise UsageError(f"{flag}: {part.strip()!r} is not key=value (in {text!r})")
        if key in out:
            raise UsageError(f"{flag}: {key}= given twice (in {text!r})")
        out[key] = value.strip()
    return out


def _type(flag: str, fields: dict[str, str], allowed: tuple[str, ...]) -> str:
    kind = fields.pop("type", "").lower()
    if not kind:
        raise UsageError(f"{flag}: type= is missing (expected one of: {', '.join(allowed)})")
    if kind not in allowed:
        if kind in _TYPES:
            hint = " (use type=registry,ref=IMAGE: it reads an inline cache too)" if kind == "inline" else ""
            raise UsageError(f"{flag}: type {kind!r} cannot be used here{hint}")
        raise UsageError(f"{flag}: unknown type {kind!r}{_suggest(kind, allowed)}")
    return kind


_SWAPPED = {"dest": "--cache-from reads src=DIR; dest= is for --cache-to", "src": "--cache-to writes dest=DIR"}


def _check_keys(flag: str, kind: str, fields: dict[str, str], allowed: tuple[str, ...]) -> None:
    for key in fields:
        if key not in allowed:
            hint = f" ({_SWAPPED[key]})" if kind == "local" and key in _SWAPPED else _suggest(key, allowed)
            raise UsageError(f"{flag}: unknown key {key!r} for type={kind}{hint}")


def _bool(flag: str, key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise UsageError(f"{flag}: {key}={value!r} is not a boolean (true or false)") from None


def _required(flag: str, kind: str, fields: dict[str, str], key: str) -> str:
    value = fields.pop(key, "")
    if not value:
        raise UsageError(f"{flag}: type={kind} needs {key}=")
    return value


def _ref(flag: str, text: str) -> str:
    from imgci import reference
    from imgci.errors import InvalidReferenceError

    try:
        return str(reference.parse(text))
    except InvalidReferenceError as e:
        raise UsageError(f"{flag}: invalid ref {text!r}: {e.message}") from None


def parse_size(text: str, *, flag: str = "max-size") -> int:
    """Bytes from ``500m``, ``2g``, ``1.5GiB``, ``1048576``; raises UsageError otherwise."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise UsageError(f"{flag}: invalid size {text!r} (e.g. 500m, 2g)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_cache_from(text: str) -> CacheSpec:
    flag = "--cache-from"
    if "=" not in text:
        if not text.strip():
            raise UsageError(f"{flag}: empty value")
        return CacheSpec("registry", _ref(flag, text.strip()), raw=text)
    fields = _fields(flag, text)
    kind = _type(flag, fields, ("registry", "local"))
    _check_keys(flag, kind, fields, _FROM_KEYS[kind])
    if kind == "registry":
        return CacheSpec(kind, _ref(flag, _required(flag, kind, fields, "ref")), raw=text)
    return CacheSpec(kind, _required(flag, kind, fields, "src"), raw=text)


def parse_cache_to(text: str) -> CacheSpec:
    flag = "--cache-to"
    if not text.strip():
        raise UsageError(f"{flag}: empty value (type=registry,ref=REF | type=local,dest=DIR | type=inline)")
    fields = _fields(flag, text) if "=" in text else {"type": "registry", "ref": text.strip()}
    kind = _type(flag, fields, _TYPES)
    _check_keys(flag, kind, fields, _TO_KEYS[kind])
    ignore_error = _bool(flag, "ignore-error", fields.pop("ignore-error")) if "ignore-error" in fields else True
    if kind == "inline":
        return CacheSpec(kind, ignore_error=ignore_error, raw=text)
    if kind == "registry":
        location = _ref(flag, _required(flag, kind, fields, "ref"))
        if "@" in location:
            raise UsageError(f"{flag}: ref= must name a tag to write, not a digest ({location})")
    else:
        location = _required(flag, kind, fields, "dest")
    mode = fields.pop("mode", "min").lower()
    if mode not in ("min", "max"):
        raise UsageError(f"{flag}: mode={mode!r} must be min or max{_suggest(mode, ('min', 'max'))}")
    compression = fields.pop("compression", "gzip").lower()
    if compression not in _COMPRESSIONS:
        raise UsageError(f"{flag}: compression={compression!r} is not supported{_suggest(compression, _COMPRESSIONS)}")
    max_size = parse_size(fields.pop("max-size"), flag=f"{flag} max-size") if "max-size" in fields else None
    extra: dict[str, str] = {}
    for key in ("force-compression", "image-manifest", "oci-mediatypes"):
        if key in fields:
            extra[key] = str(_bool(flag, key, fields.pop(key))).lower()
    if "compression-level" in fields:
        level = fields.pop("compression-level")
        if not level.isdigit():
            raise UsageError(f"{flag}: compression-level={level!r} is not a number")
        extra["compression-level"] = level
    return CacheSpec(
        kind,
        location,
        mode=mode,
        compression=compression,
        ignore_error=ignore_error,
        max_size=max_size,
        raw=text,
        extra=extra,
    )
