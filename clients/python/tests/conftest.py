"""The harness of the SDK's tests: a real `patchport serve` process per test (SQLite and
file:// blobs in a temporary directory, one in-process worker), the fixtures, and the skip
rules (a missing binary or Python package skips with the reason, never passes silently)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"
LISTENING = "patchport registry listening on "

# Variables of the caller's shell that would change what a test server does.
_SCRUB = [
    "PATCHPORT_ADMIN_TOKEN",
    "PATCHPORT_AUTH",
    "PATCHPORT_TOKEN",
    "PATCHPORT_REGISTRY",
    "PATCHPORT_CA_CERT",
    "PATCHPORT_LISTEN",
    "PATCHPORT_DATABASE",
    "PATCHPORT_BLOBS",
    "PATCHPORT_WORKERS",
]


def patchport_bin() -> Optional[Path]:
    """The `patchport` binary: $PATCHPORT_BIN, else the debug build in $CARGO_TARGET_DIR,
    else the repository's target/debug."""
    env = os.environ.get("PATCHPORT_BIN")
    if env:
        return Path(env)
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "patchport")
    candidates.append(REPO / "target" / "debug" / "patchport")
    for c in candidates:
        if c.is_file():
            return c
    return None


class Serve:
    """A `patchport serve` child process; killed when the test ends."""

    def __init__(self, binary: Path, home: Path, workers: int = 1, env: Optional[Dict[str, str]] = None) -> None:
        self.binary = binary
        self.extra_env = dict(env or {})
        self.home = home
        self.workers = workers
        self.listen = "127.0.0.1:0"
        self.addr = ""
        self.proc: Optional[subprocess.Popen[str]] = None
        self.log = home / "serve.log"

    def start(self) -> "Serve":
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(self.extra_env)
        cmd = [
            str(self.binary),
            "serve",
            "--listen",
            self.listen,
            "--workers",
            str(self.workers),
            "--database",
            f"sqlite://{self.home}/registry.db",
            "--blobs",
            f"file://{self.home}/blobs",
        ]
        log = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.close()
        lines: "queue.Queue[str]" = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = ""
        if not first.startswith(LISTENING):
            self.kill()
            raise RuntimeError(f"patchport serve did not start (got {first!r}); log:\n{self.log.read_text()}")
        self.addr = first[len(LISTENING) :].strip()
        # A restart listens on the same address, so clients and cursors carry over.
        self.listen = self.addr
        return self

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> "Serve":
        """Kills it and starts it again on the same address, database and blobs."""
        self.kill()
        deadline = time.monotonic() + 30
        while True:
            try:
                return self.start()
            except RuntimeError:
                # The port may linger for a moment after the kill.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _skip(reason: str) -> None:
    pytest.skip(reason)


@pytest.fixture(scope="session")
def binary() -> Path:
    b = patchport_bin()
    if b is None:
        _skip(
            "no patchport binary: build it (cargo build -p patchport) or set PATCHPORT_BIN"
        )
    assert b is not None
    return b


@pytest.fixture
def server(binary: Path, tmp_path: Path) -> Iterator[Serve]:
    """A fresh registry with one in-process worker."""
    s = Serve(binary, tmp_path / "registry").start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def client(server: Serve) -> Iterator["object"]:
    import patchport

    c = patchport.Client(server.url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def require(module: str, hint: str = "install clients/python[test]") -> None:
    """Skips the running test, saying why, when a Python package is absent."""
    try:
        __import__(module)
    except ImportError as e:
        _skip(f"Python package {module!r} is not installed ({e}); {hint}")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


#: What ``pull`` writes beside the pulled files: the registry's OpenSSF Model Signing
#: bundle and, for a port, its signed provenance.
SIGNATURE_FILES = ("model.sig", "provenance.json")


def files_of(path: Path) -> List[str]:
    """The files under ``path`` (relative, sorted), without the signature files."""
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in SIGNATURE_FILES
    )


def publish(client: "object", fixtures: Path, patches: "tuple[str, ...]" = ("lora-qv",)) -> None:
    """acme/llama-micro v1, the given llama-micro patches on it (as acme/<patch>:1), then
    v2 published with parent v1 (which queues a port of each patch onto v2)."""
    c = client  # a patchport.Client
    c.push_base(fixtures / "llama-micro/v1", "acme/llama-micro", "v1")  # type: ignore[attr-defined]
    for p in patches:
        c.push_patch(  # type: ignore[attr-defined]
            fixtures / "llama-micro/patches" / p, f"acme/{p}", "1", base="acme/llama-micro:v1"
        )
    c.push_base(fixtures / "llama-micro/v2", "acme/llama-micro", "v2", parent="v1")  # type: ignore[attr-defined]
