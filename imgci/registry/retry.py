"""Retrying registry operations: the policy, ``Retry-After`` parsing and the tenacity loop.

Contract: only a :class:`RegistryError` with ``temporary=True`` is retried, and only while the caller says the
operation can be replayed; waits are exponential with jitter, or what ``Retry-After`` asks (capped); the loop stops
after ``attempts`` tries or before a wait would take it past ``max_elapsed`` seconds. The error that escapes says
how many attempts were made. Each retry is also told to the :func:`listen`-er of the current context (a push in
``imgci run`` counts its retries that way; worker threads inherit the listener through ``contextvars``).
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from imgci.errors import RegistryError

log = logging.getLogger("imgci.registry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, within ``max_elapsed`` seconds, sleeping ``initial_backoff * 2**n``
    (at most ``max_backoff``, ± ``jitter`` of it) or what ``Retry-After`` asks (at most ``max_retry_after``)."""

    attempts: int = 5
    max_elapsed: float = 300.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    jitter: float = 0.3

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        base = min(self.max_backoff, self.initial_backoff * (2 ** max(0, attempt - 1)))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True)
class RetryEvent:
    """One failed attempt that will be retried: ``reason`` is short (``HTTP 503``, ``connection reset``)."""

    reason: str
    message: str
    attempt: int  # the attempt that failed, 1-based
    delay: float  # seconds until the next one
    digest: str = ""  # the blob or manifest concerned, when known


_listener: ContextVar[Callable[[RetryEvent], None] | None] = ContextVar("imgci_retry_listener", default=None)


@contextmanager
def listen(callback: Callable[[RetryEvent], None]) -> Iterator[None]:
    """Call ``callback`` for every retry made in this context (and in threads started with a copy of it)."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def notify(e: BaseException, attempt: int, delay: float) -> None:
    """Tell the current listener, if any, that ``e`` failed attempt ``attempt`` and a retry follows."""
    callback = _listener.get()
    if callback is None:
        return
    if isinstance(e, RegistryError):
        reason = f"HTTP {e.status}" if e.status else (e.message.rsplit(": ", 1)[-1] or type(e).__name__)
        event = RetryEvent(reason[:80], e.message, attempt, delay, e.digest)
    else:
        event = RetryEvent(type(e).__name__, str(e), attempt, delay)
    try:
        callback(event)
    except Exception:  # a broken listener must not break the transfer
        pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date); None if absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def annotate(e: RegistryError, note: str) -> None:
    """Append ``(note)`` to the error's message, once."""
    if note not in e.message:
        e.message = f"{e.message} ({note})"
        e.args = (e.message,)


def is_temporary(e: BaseException) -> bool:
    return isinstance(e, RegistryError) and e.temporary


def run_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    replayable: Callable[[], bool] = lambda: True,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, raises a non-temporary error, or the policy is exhausted."""
    attempts = 0
    started = time.monotonic()

    def once() -> T:
        nonlocal attempts
        attempts += 1
        return fn()

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        after = exc.retry_after if isinstance(exc, RegistryError) else None
        return policy.backoff(state.attempt_number, after)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        if exc is not None:
            notify(exc, state.attempt_number, delay)
        log.info("%s (attempt %d of %d, retrying in %.1fs)", exc, state.attempt_number, policy.attempts, delay)

    if policy.attempts <= 1:
        return once()
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_before_delay(policy.max_elapsed),
        wait=wait,
        retry=tenacity.retry_if_exception(lambda e: is_temporary(e) and replayable()),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(once)
    except RegistryError as e:
        if e.temporary and not replayable():
            annotate(e, "not retried: the request body cannot be sent again")
        elif e.temporary or attempts > 1:
            noun = "attempt" if attempts == 1 else "attempts"
            annotate(e, f"gave up after {attempts} {noun} in {time.monotonic() - started:.1f}s")
        raise
