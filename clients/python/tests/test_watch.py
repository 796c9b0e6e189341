"""watch() survives a registry restart: it reconnects by itself and resumes after the
last event it yielded, with no gap and no repeat."""

import queue
import threading
from pathlib import Path

import patchport
from conftest import Serve


def test_watch_reconnects_and_resumes_after_a_restart(binary: Path, tmp_path: Path, fixtures: Path) -> None:
    server = Serve(binary, tmp_path / "reg").start()
    got: "queue.Queue[patchport.Event]" = queue.Queue()
    watcher = patchport.Client(server.url)

    def consume() -> None:
        for n, e in enumerate(watcher.watch(types=["base.published", "patch.pushed"], cursor="0")):
            got.put(e)
            if n == 2:
                return

    try:
        pusher = patchport.Client(server.url)
        pusher.push_base(fixtures / "llama-micro/v1", "acme/llama", "v1")
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        first = got.get(timeout=30)
        assert (first.type, first.base) == ("base.published", "acme/llama:v1")

        server.kill()  # SIGKILL while the stream is open
        server.restart()
        pusher.push_patch(fixtures / "llama-micro/patches/lora-qv", "acme/qv", "1", base="acme/llama:v1")
        pusher.push_base(fixtures / "llama-micro/v2", "acme/llama", "v2", parent="v1")
        second = got.get(timeout=60)
        third = got.get(timeout=60)
        assert (second.type, second.patch, second.base) == ("patch.pushed", "acme/qv:1", "acme/llama:v1")
        assert (third.type, third.base) == ("base.published", "acme/llama:v2")
        ids = [first.id, second.id, third.id]
        assert len(set(ids)) == 3, "no event repeats across the reconnect"
        t.join(timeout=30)
        assert not t.is_alive() and got.empty()
    finally:
        server.kill()
        watcher.close()
