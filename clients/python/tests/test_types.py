"""The package type-checks (mypy, configured in pyproject.toml): every public function is
annotated, and the generated .pyi files type the messages."""

import subprocess
import sys
from pathlib import Path

from conftest import require

PKG = Path(__file__).resolve().parents[1]


def test_mypy_passes() -> None:
    require("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PKG / "pyproject.toml")],
        cwd=PKG,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (PKG / "src" / "patchport" / "py.typed").is_file()
