"""`python -m bench` from the repository root (or `python path/to/bench` from anywhere).

The repository root holds a `clearance/` folder that is only one part of the
package (`clearance.core`, `.ports` and `.adapters` live in sibling folders and
are mapped by the installed package). With the root on `sys.path` that folder
would shadow the installed package, so take the root off before anything
imports `clearance`. Under `-m` the `bench` package is already imported and
finds its own modules through `bench.__path__`; run as a directory, it is not,
so import the installed `clearance` first and only then put the root back at
the end of `sys.path` for `bench` itself.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
if not __package__:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != os.path.join(_ROOT, "bench")]
    import clearance  # noqa: F401  (the installed package, before the root goes back on)

    sys.path.append(_ROOT)

from bench.runner import main  # noqa: E402  (must follow the sys.path fix above)

if __name__ == "__main__":
    sys.exit(main())
