"""``python -m imgci …``: the same entry point as the ``imgci`` console script."""

from __future__ import annotations

from imgci.cli import run

run()
