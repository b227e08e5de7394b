"""Turning registry answers and transport failures into imgci errors with useful messages.

Contract: every error names the operation and ``registry/repository[@digest|:tag]``; OCI error bodies
(``{"errors":[{"code","message","detail"}]}``) become ``CODE: message (detail)``; 401 → AuthenticationError with
the ``imgci login`` hint, 403 → AuthorizationError, 404 → RegistryNotFoundError, 408/429/5xx → a temporary
RegistryError carrying ``Retry-After``; connection failures → a temporary RegistryUnreachableError, TLS failures a
permanent one. Request headers are never part of a message.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from imgci.errors import (
    AuthenticationError,
    AuthorizationError,
    RegistryError,
    RegistryNotFoundError,
    RegistryProtocolError,
    RegistryUnreachableError,
)
from imgci.registry.auth import login_hint
from imgci.registry.retry import parse_retry_after


@dataclass(frozen=True)
class Operation:
    """What a request is for, to name it in errors: ``Operation("fetch blob", "team/app", digest=…)``."""

    action: str
    repository: str = ""
    digest: str = ""
    tag: str = ""

    def describe(self, registry: str) -> str:
        target = f"{registry}/{self.repository}" if self.repository else registry
        if self.digest:
            target += f"@{self.digest}"
        elif self.tag:
            target += f":{self.tag}"
        return f"{self.action} {target}"

    def fields(self, registry: str) -> dict[str, Any]:
        return {"registry": registry, "repository": self.repository, "digest": self.digest}


def oci_error_detail(body: bytes) -> str:
    """``CODE: message (detail)`` for each error of an OCI error body; empty when the body is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for err in errors:
        if not isinstance(err, dict):
            continue
        text = f"{err.get('code', 'UNKNOWN')}: {err.get('message', '')}".rstrip(": ")
        detail = err.get("detail")
        if detail and not isinstance(detail, dict | list):
            text += f" ({detail})"
        parts.append(text)
    return "; ".join(parts)[:500]


def oci_error_codes(body: bytes) -> set[str]:
    """The ``code`` of every error in an OCI error body."""
    try:
        doc = json.loads(body)
        return {str(e.get("code")) for e in doc.get("errors") or [] if isinstance(e, dict)}
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return set()


def status_error(
    registry: str,
    op: Operation,
    status: int,
    reason: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    username: str = "",
    other_host: str = "",
) -> RegistryError:
    """The RegistryError for a response with an unexpected ``status``; ``other_host`` names the host that answered
    when it is not the registry (an upload Location or a redirect elsewhere)."""
    detail = oci_error_detail(body) or reason
    what = op.describe(registry)
    message = f"{what}: HTTP {status}" + (f" {detail}" if detail else "")
    common: dict[str, Any] = {**op.fields(registry), "status": status}
    if status == 401 and other_host:
        # The registry's credentials were withheld from that host on purpose (see transport), so "imgci login"
        # would not help: say who asked, and that it must accept the transfer without them.
        return AuthenticationError(
            f"{what}: {other_host}, where the registry sent this request, asks for credentials: HTTP 401 "
            f"{detail}".rstrip(),
            **common,
            hint=f"imgci sends the credentials for {registry} to {registry} only; the registry's storage "
            "redirect must carry its own authorisation (e.g. a signed URL)",
        )
    if status == 401:
        who = f" as {username}" if username else " (no credentials)"
        return AuthenticationError(
            f"{what}: authentication required{who}: HTTP 401 {detail}".rstrip(), **common, hint=login_hint(registry)
        )
    if status == 403:
        return AuthorizationError(message, **common, hint=f"check your permissions on {registry}")
    if status == 404:
        return RegistryNotFoundError(message, **common)
    temporary = status in (408, 429) or status >= 500
    retry_after = parse_retry_after(headers.get("Retry-After")) if temporary else None
    return RegistryError(message, **common, temporary=temporary, retry_after=retry_after)


def exception_cause(e: BaseException) -> str:
    """A short human cause for a requests/urllib3 exception (innermost socket/TLS error when there is one)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError | ssl.CertificateError):
            return f"TLS error: {getattr(cur, 'reason', None) or cur}"
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, ConnectionResetError):
            return "connection reset by peer"
        if isinstance(cur, TimeoutError):
            return "timed out"
        if isinstance(cur, socket.gaierror):
            return f"cannot resolve the host name ({cur.strerror or cur})"
        nxt = cur.__cause__ or cur.__context__
        if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        reason = getattr(cur, "reason", None)
        if nxt is None and isinstance(reason, BaseException):
            nxt = reason
        cur = nxt
    text = str(e)
    return text if len(text) <= 300 else text[:300] + "…"


def _has_cause(e: BaseException, pred: Callable[[BaseException], bool]) -> bool:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if pred(cur):
            return True
        reason = getattr(cur, "reason", None)
        stack += [cur.__cause__, cur.__context__, reason if isinstance(reason, BaseException) else None]
        stack += [a for a in cur.args if isinstance(a, BaseException)]
    return False


def connection_error(registry: str, endpoint: str, op: Operation, e: Exception, host: str) -> RegistryError:
    """Translate a requests exception raised while talking to ``host``."""
    import requests

    cause = exception_cause(e)
    what = op.describe(registry)
    common = op.fields(registry)
    if isinstance(e, requests.exceptions.SSLError):
        return RegistryUnreachableError(
            f"{what}: {cause} (talking to {host})",
            **common,
            temporary=False,
            hint="point REQUESTS_CA_BUNDLE at the registry's CA certificate, or use --insecure-registry "
            f"{endpoint} if you trust the network",
        )
    if isinstance(e, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
        return RegistryUnreachableError(f"{what}: the connection to {host} broke: {cause}", **common, temporary=True)
    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        # "no such host" will not fix itself within a retry budget (docker does not retry it either);
        # EAI_AGAIN ("temporary failure in name resolution") will, so it stays temporary.
        unknown_host = _has_cause(e, lambda c: isinstance(c, socket.gaierror) and c.errno == socket.EAI_NONAME)
        return RegistryUnreachableError(
            f"{what}: cannot reach {host}: {cause}",
            **common,
            temporary=not unknown_host,
            hint=f"check the registry host name {endpoint!r}" if unknown_host else None,
        )
    return RegistryProtocolError(f"{what}: {cause}", **common)
