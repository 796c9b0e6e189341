"""The committed gRPC stubs are exactly what scripts/gen-stubs.sh makes from proto/."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from conftest import require

PKG = Path(__file__).resolve().parents[1]


def test_committed_stubs_equal_fresh_ones(tmp_path: Path) -> None:
    require("grpc_tools")
    subprocess.run(
        [str(PKG / "scripts" / "gen-stubs.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    committed = PKG / "src" / "patchport" / "v1"
    fresh = tmp_path / "patchport" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and not p.name.endswith(".pyc")), (
        "the committed stub files differ from the generated set: run clients/python/scripts/gen-stubs.sh"
    )
    stale = [n for n in names if not filecmp.cmp(committed / n, fresh / n, shallow=False)]
    assert not stale, f"stale stubs {stale}: run clients/python/scripts/gen-stubs.sh and commit the result"
