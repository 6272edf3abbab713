"""The source layout maps into `tessera.*` and never breaks the standard library's `operator`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tessera.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_repo_root_on_sys_path_keeps_stdlib_operator() -> None:
    code = (
        "import sys; sys.modules.pop('operator', None); import operator; "
        "assert operator.eq(2, 2) and operator.itemgetter(0)([7]) == 7; print(operator.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "operator"


def test_operator_folder_is_tessera_operator() -> None:
    import tessera.operator

    assert Path(tessera.operator.__file__).parent == ROOT / "operator"


def test_cli_lists_every_subcommand() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output
