"""A parallel DAG solver that knows nothing about Dockerfiles.

Contract:
- A :class:`Vertex` has a ``key`` (its identity: two vertices with the same key are the same work), a display
  ``name``, ``inputs`` (vertices it depends on) and ``run(ctx, input_results) -> result``.
- :meth:`Solver.solve` runs the vertices needed for the targets on a bounded worker pool, each once its inputs
  are done, independent vertices concurrently, and returns the targets' results in order.
- Identical keys run once per Solver, even when two ``solve`` calls (two builds, possibly in two threads) ask for
  them: the second waits for the first's result.
- The first failure cancels the rest of its solve: vertices not started are not started, running ones see
  ``ctx.cancelled`` set (long steps poll it or register a callback), and ``solve`` raises that first failure's
  exception (the original, not a wrapper). A vertex shared with another solve keeps running as long as some
  solve still wants it.
- Progress is reported as :class:`VertexEvent` through ``on_event`` (called from worker threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["queued", "started", "done", "failed", "cancelled"]


class Cancelled(Exception):
    """A vertex did not run (or stopped) because its solve was cancelled by another vertex's failure."""


@dataclass(frozen=True)
class VertexEvent:
    kind: EventKind
    key: str
    name: str
    time: float
    duration: float = 0.0
    error: str = ""
    cached: bool = False
    labels: tuple[str, ...] = ()  # the labels of the solves that want this vertex (see Solver.solve)


class RunContext:
    """What a running vertex gets: cancellation and a way to report progress lines under its name."""

    def __init__(self, vertex: Vertex, on_log: Callable[[Vertex, str], None]) -> None:
        self.vertex = vertex
        self._cancel = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._on_log = on_log
        self.cached = False  # a vertex sets this when it reused a previous result instead of doing the work

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise Cancelled if the solve was cancelled."""
        if self._cancel.is_set():
            raise Cancelled(f"{self.vertex.name}: cancelled")

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from another thread) when cancelled — e.g. to kill a child process."""
        with self._lock:
            if self._cancel.is_set():
                callback()
                return
            self._callbacks.append(callback)

    def log(self, line: str) -> None:
        self._on_log(self.vertex, line)

    def _cancel_now(self) -> None:
        with self._lock:
            self._cancel.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # a failing cancel hook must not stop the others
                pass


@dataclass(eq=False)
class Vertex:
    """One unit of work. ``run`` receives the RunContext and the results of ``inputs`` in order."""

    key: str
    name: str
    run: Callable[[RunContext, list[Any]], Any]
    inputs: Sequence[Vertex] = ()
    data: Any = None  # free for the caller (e.g. the Dockerfile step this vertex executes)


@dataclass(eq=False)
class _Job:
    """A vertex's one execution, shared by every solve that wants its key."""

    vertex: Vertex
    future: Future[Any] = field(default_factory=Future)
    sessions: set[int] = field(default_factory=set)
    ctx: RunContext | None = None
    started: bool = False


class Solver:
    """Schedules vertices; see the module contract. ``max_workers`` bounds concurrently running vertices."""

    def __init__(
        self,
        max_workers: int = 4,
        on_event: Callable[[VertexEvent], None] | None = None,
        on_log: Callable[[Vertex, str], None] | None = None,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="imgci-solve")
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.RLock()
        self._on_event = on_event or (lambda e: None)
        self._on_log = on_log or (lambda v, line: None)
        self._cancelled_sessions: set[int] = set()
        self._next_session = 0
        self._labels: dict[int, str] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Solver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ---------------------------------------------------------------------------------------------
    def solve(self, targets: Sequence[Vertex], *, label: str = "") -> list[Any]:
        """Run what ``targets`` need; ``label`` names this solve in the events of its vertices (e.g. a matrix
        entry), so a caller running several solves at once can tell whose work an event was."""
        with self._lock:
            session = self._next_session
            self._next_session += 1
            if label:
                self._labels[session] = label
        futures = [self._ensure(v, session, set()) for v in targets]
        first_error: list[BaseException] = []
        done = threading.Event()
        remaining = [len(futures)]
        lock = threading.Lock()

        def finished(f: Future[Any]) -> None:
            with lock:
                exc = f.exception()
                if exc is not None and not first_error:
                    first_error.append(exc)
                    done.set()
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        for f in futures:
            f.add_done_callback(finished)
        if not futures:
            return []
        try:
            done.wait()
        except KeyboardInterrupt:
            self._cancel_session(session)
            raise
        if first_error:
            self._cancel_session(session)
            raise first_error[0]
        return [f.result() for f in futures]

    def cancel_all(self) -> None:
        """Cancel every solve in progress (e.g. a matrix entry failed and the others should stop): vertices not
        started will not start, running ones see ``ctx.cancelled``; each ``solve`` raises :class:`Cancelled`
        unless it fails otherwise first."""
        with self._lock:
            sessions = set(range(self._next_session))
        for session in sorted(sessions - self._cancelled_sessions):
            self._cancel_session(session)

    # -- scheduling -----------------------------------------------------------------------------------------
    def _ensure(self, vertex: Vertex, session: int, visiting: set[str]) -> Future[Any]:
        if vertex.key in visiting:
            raise ValueError(f"dependency cycle through {vertex.name}")
        with self._lock:
            job = self._jobs.get(vertex.key)
            if job is not None:
                job.sessions.add(session)
                if (
                    job.future.done()
                    and job.future.exception() is not None
                    and isinstance(job.future.exception(), Cancelled)
                ):
                    # an earlier solve cancelled this job before it ran: this solve wants it, so run it afresh
                    del self._jobs[vertex.key]
                    job = None
            if job is not None:
                self._add_to_inputs_sessions(job.vertex, session)
                return job.future
            job = _Job(vertex, sessions={session})
            self._jobs[vertex.key] = job
        self._emit("queued", vertex, job)
        input_futures = [self._ensure(i, session, visiting | {vertex.key}) for i in vertex.inputs]
        if not input_futures:
            self._submit(job)
            return job.future
        pending = [len(input_futures)]
        lock = threading.Lock()

        def input_done(f: Future[Any]) -> None:
            exc = f.exception()
            with lock:
                if job.future.done():
                    return
                if exc is not None:
                    self._fail(job, exc)
                    return
                pending[0] -= 1
                ready = pending[0] == 0
            if ready:
                self._submit(job)

        for f in input_futures:
            f.add_done_callback(input_done)
        return job.future

    def _add_to_inputs_sessions(self, vertex: Vertex, session: int) -> None:
        for i in vertex.inputs:
            job = self._jobs.get(i.key)
            if job is not None and session not in job.sessions:
                job.sessions.add(session)
                self._add_to_inputs_sessions(i, session)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if job.future.done():
                return
            if job.sessions and job.sessions <= self._cancelled_sessions:
                self._fail(job, Cancelled(f"{job.vertex.name}: cancelled"), emit=True)
                return
            job.ctx = RunContext(job.vertex, self._on_log)
        try:
            self._pool.submit(self._run, job)
        except RuntimeError as e:  # pool shut down
            self._fail(job, Cancelled(f"{job.vertex.name}: {e}"))

    def _run(self, job: _Job) -> None:
        assert job.ctx is not None
        with self._lock:
            if job.sessions and job.sessions <= self._cancelled_sessions:
                self._fail(job, Cancelled(f"{job.vertex.name}: cancelled"), emit=True)
                return
            job.started = True
        inputs = [self._jobs_result(i) for i in job.vertex.inputs]
        start = time.monotonic()
        self._emit("started", job.vertex, job)
        try:
            result = job.vertex.run(job.ctx, inputs)
        except BaseException as e:
            self._fail(job, e, duration=time.monotonic() - start, emit=True)
            return
        self._emit("done", job.vertex, job, duration=time.monotonic() - start, cached=job.ctx.cached)
        job.future.set_result(result)

    def _jobs_result(self, vertex: Vertex) -> Any:
        with self._lock:
            job = self._jobs[vertex.key]
        return job.future.result()

    def _fail(self, job: _Job, exc: BaseException, *, duration: float = 0.0, emit: bool = False) -> None:
        if job.future.done():
            return
        if emit:
            kind: EventKind = "cancelled" if isinstance(exc, Cancelled) else "failed"
            self._emit(kind, job.vertex, job, duration=duration, error=str(exc))
        job.future.set_exception(exc)

    def _cancel_session(self, session: int) -> None:
        with self._lock:
            self._cancelled_sessions.add(session)
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.future.done() or not job.sessions or not job.sessions <= self._cancelled_sessions:
                continue
            if job.started and job.ctx is not None:
                job.ctx._cancel_now()
            elif not job.started:
                self._fail(job, Cancelled(f"{job.vertex.name}: cancelled"), emit=True)

    def _emit(
        self,
        kind: EventKind,
        vertex: Vertex,
        job: _Job,
        *,
        duration: float = 0.0,
        error: str = "",
        cached: bool = False,
    ) -> None:
        with self._lock:
            labels = tuple(sorted({self._labels[s] for s in job.sessions if s in self._labels}))
        try:
            self._on_event(VertexEvent(kind, vertex.key, vertex.name, time.time(), duration, error, cached, labels))
        except Exception:  # a broken progress printer must not break the build
            pass
