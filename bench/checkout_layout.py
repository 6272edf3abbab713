"""Makes `tessera` importable when a bench runs from a checkout that is not installed.

Imported for that effect (`import checkout_layout` before the first `tessera` import).

The GPU machine gets a bare copy of the tree; the package layout (pyproject's package-dir maps
api/, policies/, sim/, agents/ into `tessera`) is rebuilt there as symlinks under /tmp, the
repository root never going on sys.path (operator/ would shadow the standard library).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("/tmp/tessera-bench-tree")
FOLDERS = ("api", "policies", "sim", "agents")


def ensure_importable() -> None:
    """Link the layout onto sys.path unless an installed `tessera` is found."""
    if importlib.util.find_spec("tessera") is not None:
        return
    (TREE / "tessera").mkdir(parents=True, exist_ok=True)
    targets = {"__init__.py": ROOT / "tessera" / "__init__.py"}
    targets.update({name: ROOT / name for name in FOLDERS})
    for name, target in targets.items():
        link = TREE / "tessera" / name
        if not link.exists():
            link.symlink_to(target)
    sys.path.insert(0, str(TREE))


ensure_importable()
