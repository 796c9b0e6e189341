"""examples/journey.py, run as a user runs it, against a fresh registry with a worker."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import Serve, files_of

PKG = Path(__file__).resolve().parents[1]


def test_the_journey_script(binary: Path, tmp_path: Path, fixtures: Path) -> None:
    server = Serve(binary, tmp_path / "reg", workers=1).start()
    try:
        out = subprocess.run(
            [sys.executable, str(PKG / "examples" / "journey.py"), str(fixtures / "llama-micro"), str(tmp_path / "out")],
            env={**os.environ, "PATCHPORT_REGISTRY": server.url},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "port.completed acme/qv:1 -> acme/llama-micro:v2 succeeded"
        assert "('acme/llama-micro:v2', 'ported')" in lines[1]
        assert lines[2] == "resolved ported acme/llama-micro:v2"
        assert files_of(tmp_path / "out" / "adapter") == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert "model.safetensors" in files_of(tmp_path / "out" / "merged")
    finally:
        server.kill()
