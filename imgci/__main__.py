"""``python -m imgci …``: the same entry point as the ``imgci`` console script."""

from __future__ import annotations

import sys

from imgci.cli import main

sys.exit(main())
