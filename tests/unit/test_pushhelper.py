"""The forked push helper of ``build --push``: started only without other threads, ended without a push when the
build fails, errors raised as the same imgci error class (the pushes themselves: tests/integration/test_build.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from imgci.errors import ImgciError, RegistryError, StoreError
from imgci.pushhelper import PushHelper, _rebuild

REPO = Path(__file__).resolve().parents[2]


class _NoRegistry:
    """A client factory whose clients connect nowhere (the helper's warm-up is best effort)."""

    def __call__(self, registry: str) -> Any:
        return self

    def warm_up(self, repository: str, *, push: bool = False) -> None:
        pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _in_a_fresh_interpreter(code: str, tmp_path: Path) -> None:
    """Run ``code`` (with the helpers of this module imported) in a new interpreter: the helper forks only from a
    process without other threads, and a test process may have some (fixtures' servers)."""
    script = tmp_path / "case.py"
    head = (
        "from pathlib import Path\nfrom imgci.errors import ImageNotFoundError\n"
        "from imgci.pushhelper import PushHelper\nfrom tests.unit.test_pushhelper import _NoRegistry, _gone\n"
    )
    script.write_text(head + textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_closing_without_a_push_ends_and_reaps_the_helper(tmp_path: Path) -> None:
    _in_a_fresh_interpreter(
        f"""
        helper = PushHelper.start(Path({str(tmp_path)!r}), ["registry.invalid/a:1"], _NoRegistry())
        assert helper is not None
        helper.close()
        assert _gone(helper.pid)  # reaped: not even a zombie is left
        helper.close()  # twice is harmless
        """,
        tmp_path,
    )


def test_a_push_of_a_missing_image_is_the_same_error_in_the_parent(tmp_path: Path) -> None:
    _in_a_fresh_interpreter(
        f"""
        helper = PushHelper.start(Path({str(tmp_path / "state")!r}), ["registry.invalid/a:1"], _NoRegistry())
        assert helper is not None
        try:
            helper.push(["registry.invalid/a:1"])  # the helper's store has no such image
            raise AssertionError("pushed")
        except ImageNotFoundError as e:
            assert e.message == "image registry.invalid/a:1 is not in the local store", e.message  # as in-process
            assert e.hint == "see `imgci ls`"
        assert _gone(helper.pid)
        """,
        tmp_path,
    )


def test_no_helper_while_other_threads_run(tmp_path: Path) -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert PushHelper.start(tmp_path, ["registry.invalid/a:1"], _NoRegistry()) is None  # fork is unsafe then
    finally:
        stop.set()
        t.join()


def test_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCI_PUSH_HELPER", "0")
    assert PushHelper.start(tmp_path, ["registry.invalid/a:1"], _NoRegistry()) is None


def test_errors_keep_their_class_message_and_hint() -> None:
    e = _rebuild({"type": "RegistryError", "message": "registry r: HTTP 503", "hint": "try later"})
    assert type(e) is RegistryError and e.message == "registry r: HTTP 503" and e.hint == "try later"
    assert type(_rebuild({"type": "StoreError", "message": "m", "hint": None})) is StoreError
    assert type(_rebuild({"type": "KeyboardInterrupt", "message": "m"})) is ImgciError  # only imgci's own classes
