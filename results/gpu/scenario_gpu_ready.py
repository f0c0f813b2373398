#!/usr/bin/env python
"""The GPU scenario's command: ``python3 results/gpu/scenario_gpu_ready.py --out $OUT`` (``--dry-run`` on a CPU;
``--model pixart-sigma-xl`` for PixArt-Σ-XL, SD3-medium by default).

The scenario itself is :mod:`tokprune.bench.scenarios.gpu_ready`; this file only makes it runnable from
a checkout that is not installed (a GPU host that got the working tree): the repository's top-level
folders are the ``tokprune.*`` sub-packages, so they are added to ``tokprune``'s package path.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _importable() -> None:
    try:
        import tokprune.bench.scenarios.gpu_ready  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        for name in [m for m in sys.modules if m == "tokprune" or m.startswith("tokprune.")]:
            del sys.modules[name]
        import tokprune

        tokprune.__path__.append(str(REPO))  # tokprune.bench -> <repo>/bench, tokprune.pruning -> <repo>/pruning, ...


if __name__ == "__main__":
    _importable()
    from tokprune.bench.scenarios.gpu_ready import main

    raise SystemExit(main())
