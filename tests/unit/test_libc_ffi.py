"""``imgci.build.sandbox._libc_ffi`` is cffi's out-of-line module for ``libc._CDEF``: it has to declare exactly
what ``_CDEF`` declares (a changed declaration without regenerating it would call libc with the wrong types), and
be what ``python -m imgci.build.sandbox.libc`` writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cffi

from imgci.build.sandbox import libc
from imgci.build.sandbox._libc_ffi import ffi as generated
from tests.conftest import REPO


def _names() -> list[str]:
    return re.findall(r"\b(\w+)\(", libc._CDEF)


def test_the_generated_module_declares_what_cdef_declares() -> None:
    inline = cffi.FFI()
    inline.cdef(libc._CDEF)
    inline_lib, generated_lib = inline.dlopen(None), generated.dlopen(None)
    names = _names()
    assert len(names) == 8 and "unshare" in names and "capset" in names
    for name in names:
        want = inline.getctype(inline.typeof(getattr(inline_lib, name)))
        assert generated.getctype(generated.typeof(getattr(generated_lib, name))) == want, name
    assert sorted(n for n in dir(generated_lib) if not n.startswith("_")) == sorted(names)


def test_the_generated_module_is_what_the_generator_writes(tmp_path: Path) -> None:
    written = Path(libc.generate(str(tmp_path)))
    assert written == tmp_path / "imgci" / "build" / "sandbox" / "_libc_ffi.py"

    def body(text: str) -> str:  # cffi's own format version may differ between cffi releases
        return re.sub(r"_version = 0x[0-9a-fA-F]+", "_version = X", text)

    committed = REPO / "imgci" / "build" / "sandbox" / "_libc_ffi.py"
    assert body(written.read_text()) == body(committed.read_text())


def test_libc_loads_without_parsing_declarations() -> None:
    # pycparser (cdef's parser) is what made libc cost ~29 ms in every sandbox child
    code = (
        "import sys\nfrom imgci.build.sandbox import libc\nlibc.preload()\n"
        "libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)\n"
        "print('pycparser' in sys.modules, 'cffi' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_errors_still_carry_errno_and_the_call() -> None:
    try:
        libc.umount("/nonexistent/imgci-test-path")
    except OSError as e:
        assert e.errno in (2, 1, 22)  # ENOENT, EPERM or EINVAL, depending on privileges
        assert "umount /nonexistent/imgci-test-path" in str(e)
    else:
        raise AssertionError("umount of a missing path succeeded")
