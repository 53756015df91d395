"""End to end on the real SGLang server: disk writes keep up with back-to-back traffic
(written within max_disk_write_delay even though the server is never idle), and a
SIGTERM to the server's process group writes what is still queued before the scheduler
exits."""

import threading
import time

from lmcache_sgl.server import SGLangServer

from test_e2e_server import CHUNK, PROMPT, config_file, models, prompts  # noqa: F401  (models: a fixture)


def frames(directory) -> int:
    return sum(1 for _ in directory.glob("*.lmsg")) if directory.is_dir() else 0


def test_writes_keep_up_under_traffic_and_survive_sigterm(models, tmp_path):  # noqa: F811
    cfg = config_file(tmp_path, max_local_cpu_size=0.5, max_disk_write_delay=1.0)
    args = ["--enable-lmcache", "--lmcache-config-file", cfg, "--max-total-tokens", "4000", "--log-level", "info"]
    srv = SGLangServer(models["tiny"], extra_args=args, log_path=tmp_path / "server.log")
    disk, busy = tmp_path / "disk", prompts(40, seed=7)
    with srv:
        srv.wait_healthy()
        written_while_busy, served, stop = [], [], threading.Event()

        def traffic(batch):
            for p in batch:
                if stop.is_set():
                    return
                srv.generate(p, max_new_tokens=2)
                served.append(p)

        clients = [threading.Thread(target=traffic, args=(busy[i::2],)) for i in range(2)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(c.is_alive() for c in clients) and not written_while_busy:
            if frames(disk):
                written_while_busy.append(frames(disk))
            time.sleep(0.2)
        stop.set()
        for c in clients:
            c.join()
        last = prompts(3, seed=8)
        for p in last:
            srv.generate(p, max_new_tokens=2)
    # Leaving the with block sent SIGTERM to the process group right after the last response.
    assert written_while_busy, "no frame reached the disk while two clients kept the server busy"
    log = srv.log_path.read_text()
    assert "stopping on SIGTERM: queued writes finished" in log, log[-3000:]
    # Every served prompt's whole chunks and trailing partial one (a chunked prefill may
    # also leave the partial chunk of an intermediate checkpoint).
    chunks_per_prompt = -(-PROMPT // CHUNK)
    assert frames(disk) >= (len(served) + len(last)) * chunks_per_prompt, "stored chunks were lost at shutdown"
