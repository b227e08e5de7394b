"""Fault actions and bookkeeping for :mod:`tests.infra.faultproxy`.

Contract: each action is an immutable value describing what the proxy does to one matching request;
the factory functions (``status``, ``reset_after``, ...) are the intended way to build them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Status:
    """Answer ``code`` without forwarding (the request body is read and discarded first)."""

    code: int
    headers: dict[str, str] | None = None
    body: bytes = b""


@dataclass(frozen=True)
class ResetAfter:
    """Drop the client connection with a TCP RST (SO_LINGER 0) after ``nbytes`` of a body.

    ``on="request"``: after reading ``nbytes`` of the request body; the upstream never sees the request.
    ``on="response"``: forward, send the status line, headers and ``nbytes`` of the response body, then reset.
    ``on="auto"``: "request" when the request carries a body, else "response".
    """

    nbytes: int = 0
    on: Literal["auto", "request", "response"] = "auto"


@dataclass(frozen=True)
class CorruptBody:
    """Forward, but XOR 0xFF the response body bytes in [offset, offset + count); the length is unchanged."""

    offset: int = 0
    count: int = 1


@dataclass(frozen=True)
class TruncateBody:
    """Forward with the upstream's headers (so the declared Content-Length) but only ``nbytes`` of the body,
    then close the connection cleanly (FIN)."""

    nbytes: int


@dataclass(frozen=True)
class Delay:
    """Sleep ``seconds``, then forward normally."""

    seconds: float


@dataclass(frozen=True)
class Relocate:
    """Forward normally, but point the answer's ``Location`` at ``base`` (``scheme://host:port``), keeping its
    path and query: an upload session (or a redirect) that continues on another host, as with a registry whose
    uploads go to a storage front end. Without a ``Location`` in the answer this is a plain forward."""

    base: str


@dataclass(frozen=True)
class DropAnswer:
    """Forward the request (the upstream acts on it), then reset the client connection instead of answering:
    a request that went through but whose answer was lost."""


Action = Status | ResetAfter | CorruptBody | TruncateBody | Delay | Relocate | DropAnswer


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Status:
    """Answer ``code`` (e.g. 503, or 429 with ``{"Retry-After": "1"}``) without forwarding."""
    return Status(code, headers, body)


def reset_after(nbytes: int = 0, on: Literal["auto", "request", "response"] = "auto") -> ResetAfter:
    """Reset the connection after ``nbytes`` of the request or response body; see :class:`ResetAfter`."""
    return ResetAfter(nbytes, on)


def corrupt_body(offset: int = 0, count: int = 1) -> CorruptBody:
    """Flip ``count`` response body bytes starting at ``offset``, keeping the length."""
    return CorruptBody(offset, count)


def truncate_body(nbytes: int) -> TruncateBody:
    """Send only the first ``nbytes`` of the response body under the full Content-Length, then close."""
    return TruncateBody(nbytes)


def delay(seconds: float) -> Delay:
    """Wait before forwarding."""
    return Delay(seconds)


def drop_answer() -> DropAnswer:
    """Let the upstream handle the request, but never tell the client: a TCP RST instead of the status line."""
    return DropAnswer()


def relocate(base: str) -> Relocate:
    """Forward, then move the answer's ``Location`` to ``base`` (e.g. another FaultProxy's ``url``)."""
    return Relocate(base.rstrip("/"))


@dataclass
class FaultRule:
    """One rule; ``fired`` counts how often it has fired so far."""

    method: str | None
    path: re.Pattern[str]
    times: int | None
    action: Action
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        exhausted = self.times is not None and self.fired >= self.times
        return not exhausted and self.method in (None, method) and self.path.search(target) is not None


class RequestRecord(NamedTuple):
    """What the proxy saw: method, request target (path and query) and the status sent (None: none sent)."""

    method: str
    path: str
    status: int | None


class HeaderRecord(NamedTuple):
    """The headers of one request as the client sent them (names as sent; compare case-insensitively)."""

    method: str
    path: str
    headers: dict[str, str]

    def get(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


def relocated(location: str, base: str) -> str:
    """``location`` (absolute) with its scheme and host:port replaced by ``base``'s."""
    loc, new = urlsplit(location), urlsplit(base)
    return urlunsplit((new.scheme, new.netloc, loc.path, loc.query, loc.fragment))


def flip_bytes(piece: bytes, start: int, action: CorruptBody) -> bytes:
    """XOR 0xFF the bytes of ``piece`` (which begins at body offset ``start``) inside the action's range."""
    lo, hi = max(action.offset, start), min(action.offset + action.count, start + len(piece))
    if lo >= hi:
        return piece
    buf = bytearray(piece)
    for i in range(lo - start, hi - start):
        buf[i] ^= 0xFF
    return bytes(buf)
