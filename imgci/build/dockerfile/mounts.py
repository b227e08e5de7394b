"""``RUN --mount`` specs as BuildKit parses them (frontend/dockerfile/instructions/commands_runmount.go).

Contract: :func:`parse_mount` turns one ``--mount`` value into a dict with canonical keys, raising
:class:`ValueError` with BuildKit's message; the instruction layer adds the location.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

Expander = Callable[[str], str]

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
SHARING_MODES = ("shared", "private", "locked")
_MOUNT_KEYS = {
    "type": "type",
    "from": "from",
    "source": "source",
    "src": "source",
    "target": "target",
    "dst": "target",
    "destination": "target",
    "readonly": "readonly",
    "ro": "readonly",
    "readwrite": "readwrite",
    "rw": "readwrite",
    "required": "required",
    "size": "size",
    "id": "id",
    "sharing": "sharing",
    "mode": "mode",
    "uid": "uid",
    "gid": "gid",
    "env": "env",
}


def _suggest(value: str, options: list[str] | tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f" (did you mean {hint[0]}?)" if hint else ""


def _go_bool(value: str) -> bool:
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(value)


def go_csv_record(text: str) -> list[str]:
    """One record as Go's encoding/csv reads it (strict quotes: a quote inside an unquoted field is an error)."""
    text = text.rstrip("\r\n")
    if not text:
        raise ValueError("EOF")
    fields: list[str] = []
    pos = 0
    while True:
        column = pos + 1
        if text.startswith('"', pos):
            value, pos = [], pos + 1
            while True:
                end = text.find('"', pos)
                if end < 0:
                    raise ValueError(
                        f'parse error on line 1, column {len(text) + 1}: extraneous or missing " in quoted-field'
                    )
                value.append(text[pos:end])
                pos = end + 1
                if text.startswith('"', pos):
                    value.append('"')
                    pos += 1
                    continue
                if pos < len(text) and text[pos] != ",":
                    raise ValueError(
                        f'parse error on line 1, column {pos + 1}: extraneous or missing " in quoted-field'
                    )
                break
            fields.append("".join(value))
        else:
            end = text.find(",", pos)
            field_text = text[pos:] if end < 0 else text[pos:end]
            if '"' in field_text:
                raise ValueError(
                    f'parse error on line 1, column {column + field_text.index(chr(34))}: bare " in non-quoted-field'
                )
            fields.append(field_text)
            pos = len(text) if end < 0 else end
        if pos >= len(text):
            return fields
        pos += 1  # the comma
        if pos == len(text):
            fields.append("")
            return fields


def parse_mount(spec: str, expand: Expander | None) -> dict[str, str]:
    """One ``--mount`` value as a dict, as BuildKit's parseMount.

    Without ``expand`` (at parse time) only CSV syntax and variables in ``from`` are checked and values are kept as
    written. With ``expand`` every value is expanded and validated. Keys are canonical: ``type`` (default ``bind``),
    ``from``, ``source``, ``target``, ``readonly`` (``"true"``/``"false"``; default true except for cache/tmpfs),
    ``id``, ``sharing``, ``required``, ``mode``, ``uid``, ``gid``, ``size``, ``env``.
    """
    try:
        fields = go_csv_record(spec)
    except ValueError as e:
        raise ValueError(f"failed to parse csv mounts: {e}") from None
    mount: dict[str, str] = {"type": "bind"}
    readonly_auto = True
    for field_text in fields:
        key, eq, value = field_text.partition("=")
        key = key.lower()
        if not eq:
            if key in ("readonly", "ro", "readwrite", "rw"):
                mount["readonly"] = "true" if key in ("readonly", "ro") else "false"
                readonly_auto = False
            elif key == "required" and (expand is None or mount["type"] in ("secret", "ssh")):
                mount["required"] = "true"
            elif key == "required":
                raise ValueError(f"unexpected key '{key}' for mount type '{mount['type']}'")
            elif expand is not None:
                raise ValueError(f"invalid field '{field_text}' must be a key=value pair")
            continue
        if expand is not None:
            value = expand(value)
        elif key == "from" and re.search(r"\$.", value):
            raise ValueError(f"'{key}' doesn't support variable expansion, define alias stage instead")
        canonical = _MOUNT_KEYS.get(key)
        if canonical is None:
            if expand is not None:
                raise ValueError(f"unexpected key '{key}' in '{field_text}'{_suggest(key, list(_MOUNT_KEYS))}")
        elif expand is None:
            if canonical in ("readonly", "readwrite"):
                truthy = value.lower() in ("1", "t", "true")
                mount["readonly"] = "true" if truthy == (canonical == "readonly") else "false"
                readonly_auto = False
            else:
                mount[canonical] = value.lower() if canonical == "type" else value
        else:
            _validate_mount_field(mount, key, canonical, value)
            readonly_auto = readonly_auto and canonical not in ("readonly", "readwrite")
    if readonly_auto:
        mount["readonly"] = "false" if mount["type"] in ("cache", "tmpfs") else "true"
    if expand is not None:
        _validate_mount(mount)
    return mount


def _validate_mount_field(mount: dict[str, str], key: str, canonical: str, value: str) -> None:
    kind = mount["type"]
    if canonical == "type":
        if value.lower() not in MOUNT_TYPES:
            raise ValueError(f'unsupported mount type "{value}"{_suggest(value, MOUNT_TYPES)}')
        mount["type"] = value.lower()
    elif canonical in ("readonly", "readwrite", "required"):
        try:
            flag = _go_bool(value)
        except ValueError:
            raise ValueError(f"invalid value for {key}: {value}") from None
        if canonical == "required":
            if kind not in ("secret", "ssh"):
                raise ValueError(f"unexpected key '{key}' for mount type '{kind}'")
            mount["required"] = "true" if flag else "false"
        else:
            mount["readonly"] = "true" if flag == (canonical == "readonly") else "false"
    elif canonical == "size":
        if kind != "tmpfs":
            raise ValueError(f"unexpected key '{key}' for mount type '{kind}'")
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)* ?[kKmMgGtTpP]?[iI]?[bB]?", value):
            raise ValueError(f"invalid value for {key}: {value}")
        mount["size"] = value
    elif canonical == "sharing":
        if value.lower() not in SHARING_MODES:
            raise ValueError(f'unsupported sharing value "{value}"{_suggest(value, SHARING_MODES)}')
        mount["sharing"] = value.lower()
    elif canonical == "mode":
        if not re.fullmatch(r"[0-7]+", value) or int(value, 8) >= 1 << 32:
            raise ValueError(f"invalid value {value} for mode")
        mount["mode"] = value
    elif canonical in ("uid", "gid"):
        if not re.fullmatch(r"[0-9]+", value) or int(value) >= 1 << 32:
            raise ValueError(f"invalid value {value} for {canonical}")
        mount[canonical] = value
    elif canonical == "env" and kind != "secret":
        raise ValueError(f"unexpected key '{key}' for mount type '{kind}'")
    else:
        mount[canonical] = value


def _validate_mount(mount: dict[str, str]) -> None:
    kind = mount["type"]
    if kind not in ("secret", "ssh", "cache"):
        for key in ("mode", "uid", "gid"):
            if key in mount:
                raise ValueError(f'{key} not allowed for "{kind}" type mounts')
    if kind == "secret":
        if mount.get("from"):
            raise ValueError("secret mount should not have a from")
        if mount.get("sharing"):
            raise ValueError("secret mount should not define sharing")
        if not mount.get("source") and not mount.get("target") and not mount.get("id") and not mount.get("env"):
            raise ValueError("invalid secret mount. one of source, target required")
        if mount.get("source") and mount.get("id"):
            raise ValueError("both source and id can't be set")
    if mount.get("sharing") and kind != "cache":
        raise ValueError(f"invalid cache sharing set for {kind} mount")
