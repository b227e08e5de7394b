"""``python -m imgci._sandbox``: the sandbox child process (see :mod:`imgci.build.sandbox.child`), or with
``--fork-server FD`` the fork server that forks such children (:mod:`imgci.build.sandbox.forkserver`)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--fork-server":
        from imgci.build.sandbox.forkserver import serve

        serve(int(sys.argv[2]))
        sys.exit(0)
    from imgci.build.sandbox.child import main

    sys.exit(main())
