"""Sizes and durations as users write them on the command line (``500m``, ``2GiB``, ``24h``, ``90m``, ``7d``).

Contract: :func:`parse_size` gives bytes (k/m/g/t/p, binary multiples, an optional ``i``/``b``/``ib``; a plain
number is bytes); :func:`parse_duration` gives seconds (s/m/h/d/w, combinable as Go's ``1h30m``; a plain number
is seconds). Both raise ValueError with a readable message.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtTpP]?)(?:[iI]?[bB])?\s*", text)
    if not match:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional k, m, g or t suffix (500m, 2g)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float:
    text = text.strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}: expected e.g. 90m, 24h, 7d or 1h30m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
