"""The solver with toy vertices that add numbers: ordering, concurrency, dedupe, cancellation, first cause."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from imgci.build.solver import Cancelled, RunContext, Solver, Vertex, VertexEvent


def num(key: str, value: int, *inputs: Vertex, sleep: float = 0.0, calls: list[str] | None = None) -> Vertex:
    def run(ctx: RunContext, results: list[Any]) -> int:
        if calls is not None:
            calls.append(key)
        if sleep:
            time.sleep(sleep)
        return value + sum(results)

    return Vertex(key=key, name=key, run=run, inputs=inputs)


def test_results_flow_through_the_graph() -> None:
    a, b = num("a", 1), num("b", 2)
    c = num("c", 10, a, b)
    d = num("d", 100, c, a)
    with Solver(max_workers=2) as s:
        assert s.solve([d, c]) == [100 + 13 + 1, 13]


def test_independent_vertices_overlap_in_time() -> None:
    events: list[VertexEvent] = []
    lock = threading.Lock()

    def record(e: VertexEvent) -> None:
        with lock:
            events.append(e)

    a, b = num("a", 1, sleep=0.3), num("b", 2, sleep=0.3)
    top = num("top", 0, a, b)
    start = time.monotonic()
    with Solver(max_workers=2, on_event=record) as s:
        assert s.solve([top]) == [3]
    assert time.monotonic() - start < 0.55  # both 0.3 s sleeps ran at once
    started = {e.key: e.time for e in events if e.kind == "started"}
    done = {e.key: e.time for e in events if e.kind == "done"}
    assert started["b"] < done["a"] and started["a"] < done["b"]
    assert started["top"] >= max(done["a"], done["b"])


def test_worker_bound_is_respected() -> None:
    running = [0]
    peak = [0]
    lock = threading.Lock()

    def run(ctx: RunContext, results: list[Any]) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return 1

    vs = [Vertex(key=f"v{i}", name=f"v{i}", run=run) for i in range(8)]
    with Solver(max_workers=3) as s:
        assert s.solve(vs) == [1] * 8
    assert peak[0] == 3


def test_identical_keys_run_once_across_stages_and_concurrent_solves() -> None:
    calls: list[str] = []
    shared1 = num("base", 5, sleep=0.2, calls=calls)
    shared2 = num("base", 5, sleep=0.2, calls=calls)  # a different object with the same key
    x = num("x", 1, shared1, calls=calls)
    y = num("y", 2, shared2, calls=calls)
    results: dict[str, list[Any]] = {}
    with Solver(max_workers=4) as s:
        t = threading.Thread(target=lambda: results.__setitem__("t", s.solve([y])))
        t.start()
        results["main"] = s.solve([x, y])
        t.join()
    assert calls.count("base") == 1
    assert calls.count("y") == 1
    assert results == {"main": [6, 7], "t": [7]}


def test_failure_cancels_the_rest_and_raises_the_first_cause() -> None:
    events: list[VertexEvent] = []
    calls: list[str] = []
    slow_cancelled = threading.Event()

    def boom(ctx: RunContext, results: list[Any]) -> int:
        time.sleep(0.05)
        raise ValueError("step 3 failed: exit code 1")

    def slow(ctx: RunContext, results: list[Any]) -> int:
        ctx.on_cancel(slow_cancelled.set)
        for _ in range(100):
            if ctx.cancelled:
                raise Cancelled("slow: cancelled")
            time.sleep(0.02)
        return 1

    fail = Vertex(key="fail", name="fail", run=boom)
    long = Vertex(key="slow", name="slow", run=slow)
    after = num("after", 1, fail, calls=calls)
    never = num("never", 1, long, calls=calls)
    start = time.monotonic()
    with Solver(max_workers=2, on_event=events.append) as s:
        with pytest.raises(ValueError, match="step 3 failed"):
            s.solve([after, never])
        assert time.monotonic() - start < 1.0  # did not wait for the slow vertex
        assert slow_cancelled.wait(1.0)
    assert calls == []  # dependents of the failure, and of the cancelled vertex, never ran
    kinds = {(e.key, e.kind) for e in events}
    assert ("fail", "failed") in kinds
    assert ("slow", "cancelled") in kinds


def test_a_vertex_shared_with_a_live_solve_is_not_cancelled() -> None:
    gate = threading.Event()

    def shared_run(ctx: RunContext, results: list[Any]) -> int:
        gate.wait(2)
        return 0 if ctx.cancelled else 41

    shared = Vertex(key="shared", name="shared", run=shared_run)
    fail = Vertex(key="fail", name="fail", run=lambda ctx, r: (_ for _ in ()).throw(RuntimeError("nope")))
    a = num("a", 0, shared, fail)
    b = num("b", 1, shared)
    out: dict[str, Any] = {}
    with Solver(max_workers=4) as s:
        t = threading.Thread(target=lambda: out.__setitem__("b", s.solve([b])))
        t.start()
        time.sleep(0.05)
        with pytest.raises(RuntimeError, match="nope"):
            s.solve([a])
        gate.set()
        t.join()
    assert out["b"] == [42]


def test_cached_flag_is_reported() -> None:
    events: list[VertexEvent] = []

    def run(ctx: RunContext, results: list[Any]) -> int:
        ctx.cached = True
        return 1

    with Solver(on_event=events.append) as s:
        s.solve([Vertex(key="k", name="k", run=run)])
    assert [e.cached for e in events if e.kind == "done"] == [True]
