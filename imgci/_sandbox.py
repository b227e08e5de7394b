"""``python -m imgci._sandbox``: the sandbox child process (see :mod:`imgci.build.sandbox.child`)."""

from __future__ import annotations

import sys

from imgci.build.sandbox.child import main

if __name__ == "__main__":
    sys.exit(main())
