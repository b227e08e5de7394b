"""Instruction flags and the small value grammars BuildKit validates: ``--flag`` parsing (BuildKit BFlags),
Go durations (HEALTHCHECK), port specs (EXPOSE) and stop signals. ``RUN --mount`` specs are in ``mounts``.

Contract: every function raises :class:`ValueError` with BuildKit's message; the instruction layer turns it into a
DockerfileError carrying the instruction's location.
"""

from __future__ import annotations

import difflib
import re


class Flags:
    """BuildKit BFlags: declare the flags an instruction accepts, then :meth:`parse` the words after the keyword.

    ``--name=value`` for string flags (``--name value`` is not accepted, as in BuildKit), ``--name``,
    ``--name=true|false`` for booleans; string-list flags may repeat, others may not.
    """

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self._kinds: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.used: set[str] = set()

    def add_bool(self, name: str, default: bool = False) -> None:
        self._kinds[name] = "bool"
        self.values[name] = "true" if default else "false"

    def add_string(self, name: str, default: str = "") -> None:
        self._kinds[name] = "string"
        self.values[name] = default

    def add_strings(self, name: str) -> None:
        self._kinds[name] = "strings"
        self.lists[name] = []

    def parse(self) -> None:
        for arg in self.args:
            if not arg.startswith("--"):
                raise ValueError(f"Arg should start with -- : {arg}")
            if arg == "--":
                return
            name, eq, value = arg[2:].partition("=")
            kind = self._kinds.get(name)
            if kind is None:
                hint = difflib.get_close_matches(name, list(self._kinds), n=1, cutoff=0.6)
                did_you_mean = f" (did you mean --{hint[0]}?)" if hint else ""
                raise ValueError(f"unknown flag: --{name}{did_you_mean}")
            if name in self.used and kind != "strings":
                raise ValueError(f"Duplicate flag specified: {name}")
            self.used.add(name)
            if kind == "bool":
                if eq and value == "":
                    raise ValueError(f"Missing a value on flag: {name}")
                lower = value.lower()
                if lower not in ("", "true", "false"):
                    raise ValueError(f"Expecting boolean value for flag {name}, not: {value}")
                self.values[name] = lower or "true"
            elif not eq:
                raise ValueError(f"Missing a value on flag: {name}")
            elif kind == "string":
                self.values[name] = value
            else:
                self.lists[name].append(value)

    def true(self, name: str) -> bool:
        return self.values[name] == "true"

    def optional_bool(self, name: str) -> bool | None:
        """None when the flag was not given (BuildKit's ``*bool`` flags)."""
        return self.true(name) if name in self.used else None


# -- Go time.ParseDuration ----------------------------------------------------------------------------------------

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_DURATION = (1 << 63) - 1


def parse_go_duration(text: str) -> int:
    """Go's ``time.ParseDuration`` in nanoseconds (``1h30m``, ``1.5s``, ``-2ms``, ``0``)."""
    original, s, negative = text, text, False
    if s and s[0] in "+-":
        negative, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f'time: invalid duration "{original}"')
    total = 0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise ValueError(f'time: invalid duration "{original}"')
        m = re.match(r"([0-9]*)(?:\.([0-9]*))?", s)
        assert m is not None
        whole, frac = m.group(1), m.group(2)
        if not whole and not frac:
            raise ValueError(f'time: invalid duration "{original}"')
        s = s[m.end() :]
        unit_match = re.match(r"[^0-9.]+", s)
        if unit_match is None:
            raise ValueError(f'time: missing unit in duration "{original}"')
        unit_name = unit_match.group(0)
        s = s[unit_match.end() :]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise ValueError(f'time: unknown unit "{unit_name}" in duration "{original}"')
        value = int(whole or "0") * unit
        if frac:
            # Go keeps at most the digits that fit and scales with float64, like this:
            digits, scale = 0, 1.0
            for ch in frac:
                if digits > (_MAX_DURATION // 10):
                    continue
                digits, scale = digits * 10 + int(ch), scale * 10
            value += int(float(digits) * (float(unit) / scale))
        total += value
        if total > _MAX_DURATION + (1 if negative else 0):
            raise ValueError(f'time: invalid duration "{original}"')
    return -total if negative else total


def parse_interval(name: str, value: str) -> int:
    """HEALTHCHECK duration flags: "" or 0 mean unset (0); otherwise at least 1ms."""
    if value == "":
        return 0
    duration = parse_go_duration(value)
    if duration == 0:
        return 0
    if duration < 1_000_000:
        raise ValueError(f'Interval "{name}" cannot be less than 1ms')
    return duration


def parse_go_int32(value: str) -> int:
    """strconv.ParseInt(value, 10, 32)."""
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ValueError(f'strconv.ParseInt: parsing "{value}": invalid syntax')
    number = int(value)
    if not -(1 << 31) <= number < (1 << 31):
        raise ValueError(f'strconv.ParseInt: parsing "{value}": value out of range')
    return number


# -- EXPOSE and STOPSIGNAL values ---------------------------------------------------------------------------------


def _port_range(text: str) -> tuple[int, int]:
    if not text:
        raise ValueError("empty string specified for ports")
    if "-" not in text:
        start = _port(text)
        return start, start
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"invalid port range format: {text}")
    start, end = _port(parts[0]), _port(parts[1])
    if end < start:
        raise ValueError(f"invalid range specified for port: {text}")
    return start, end


def _port(text: str) -> int:
    if not re.fullmatch(r"\+?[0-9]+", text) or int(text) > 65535:
        raise ValueError(f"invalid port: {text}")
    return int(text)


def port_specs(ports: list[str]) -> list[str]:
    """BuildKit parsePortSpecs: ``[ip:][hostPort:]port[-end][/proto]`` → ``"port/proto"`` entries (ranges expanded)."""
    out: list[str] = []
    for raw in ports:
        parts = raw.split(":")
        ip, host = (":".join(parts[:-2]), parts[-2]) if len(parts) > 2 else ("", parts[0] if len(parts) == 2 else "")
        port, _, proto = parts[-1].partition("/")
        if not port:
            raise ValueError(f"no port specified: {parts[-1]}<empty>")
        proto = proto.lower() or "tcp"
        if proto not in ("tcp", "udp", "sctp"):
            raise ValueError("invalid proto: " + proto)
        ip = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip
        if ip and not re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:.]+", ip):
            raise ValueError("invalid IP address: " + ip)
        try:
            start, end = _port_range(port)
        except ValueError:
            raise ValueError("invalid containerPort: " + port) from None
        if host:
            try:
                host_start, host_end = _port_range(host)
            except ValueError:
                raise ValueError("invalid hostPort: " + host) from None
            if end - start != host_end - host_start and end != start:
                raise ValueError(f"invalid ranges specified for container and host Ports: {port} and {host}")
        out += [f"{number}/{proto}" for number in range(start, end + 1)]
    return out


_SIGNALS = (  # noqa: SIM905 - a word list reads better than one name per line
    "ABRT ALRM BUS CHLD CLD CONT FPE HUP ILL INT IO IOT KILL PIPE POLL PROF PWR QUIT SEGV STKFLT STOP SYS TERM TRAP "
    "TSTP TTIN TTOU URG USR1 USR2 VTALRM WINCH XCPU XFSZ UNUSED RTMIN RTMAX"
).split()
SIGNAL_NAMES = frozenset([*_SIGNALS, *(f"RTMIN+{i}" for i in range(1, 16)), *(f"RTMAX-{i}" for i in range(1, 15))])


def check_signal(value: str) -> None:
    """moby/sys signal.ParseSignal: a positive number or a name with or without ``SIG`` (any case)."""
    if re.fullmatch(r"[+-]?[0-9]+", value):
        if int(value) == 0:
            raise ValueError(f"invalid signal: {value}")
        return
    name = value.upper()
    name = name[3:] if name.startswith("SIG") else name
    if name not in SIGNAL_NAMES:
        raise ValueError(f"invalid signal: {value}")
