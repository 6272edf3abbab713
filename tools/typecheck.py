"""Run mypy over the `tessera` package as it is laid out once installed.

The source folders are mapped into `tessera.*` by pyproject.toml, a mapping that mypy cannot
follow through setuptools' editable-install finder. This builds a tree of symbolic links in
build/typecheck that has the installed layout, and runs mypy on it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_link_tree() -> Path:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    tree = ROOT / "build" / "typecheck"
    package_root = tree / "tessera"
    if package_root.exists():
        for link in package_root.iterdir():
            link.unlink()
    package_root.mkdir(parents=True, exist_ok=True)
    for source in (ROOT / package_dir["tessera"]).iterdir():
        if source.suffix in {".py", ".pyi"} or source.name == "py.typed":
            (package_root / source.name).symlink_to(source)
    for package, folder in package_dir.items():
        # Only direct children of `tessera` need links; deeper packages sit in their parent.
        if package.count(".") == 1:
            (package_root / package.split(".", 1)[1]).symlink_to(ROOT / folder)
    return tree


def main() -> int:
    tree = build_link_tree()
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    command += ["-p", "tessera", *sys.argv[1:]]
    return subprocess.call(command, cwd=tree, env={"MYPYPATH": str(tree), "PATH": ""})


if __name__ == "__main__":
    sys.exit(main())
