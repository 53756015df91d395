"""The real SGLang server starts on this machine (CPU mode where there is no GPU), serves
/generate from token ids deterministically, reports radix-cache hits, and stops cleanly."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from lmcache_sgl import models, server  # noqa: E402
from lmcache_sgl.sglang import cpu_mode  # noqa: E402


def _cpu_plugin_dir(root):
    """A throw-away distribution whose only content is an ``sglang.srt.plugins`` entry
    point running CPU mode's hooks, found through PYTHONPATH by importlib.metadata, so
    that the test needs no installed package. If lmcache-sgl is installed, its own
    plugin installs the same hooks; the install is idempotent."""
    info = root / "lmcache_sgl_cpu_test-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache-sgl-cpu-test\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nlmcache_sgl_cpu_test = lmcache_sgl.sglang.cpu_mode:plugin\n")
    return root


needs_cpu_mode = pytest.mark.skipif(not cpu_mode.wanted(), reason="a GPU is present: no CPU mode")


def _nm(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True)
    return {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}


@needs_cpu_mode
def test_stub_exports_what_sgl_kernel_needs():
    if shutil.which("nm") is None:
        pytest.skip("binutils nm not installed")
    import importlib.util

    stub = cpu_mode.ensure_stub() / "libcuda.so.1"
    exported = _nm(stub, "--defined-only")
    kernel_dir = Path(importlib.util.find_spec("sgl_kernel").origin).parent
    needed = set()
    for so in kernel_dir.rglob("*.so"):
        needed |= {s for s in _nm(so, "--undefined-only") if s.startswith("cu") and s[2:3].isupper()}
    assert needed, "found no libcuda symbols in sgl_kernel: has its packaging changed?"
    assert needed <= exported, f"missing from the stub: {sorted(needed - exported)}"


@needs_cpu_mode
def test_sgl_kernel_imports_in_server_env():
    env = cpu_mode.server_env()
    code = "import sgl_kernel, torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("False")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(cpu_mode.stub_dir())
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"


def test_stub_rebuilt_when_source_changes(tmp_path, monkeypatch):
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "libcuda_stub.c"
    src.write_bytes(cpu_mode.STUB_SOURCE.read_bytes())
    monkeypatch.setattr(cpu_mode, "STUB_SOURCE", src)
    monkeypatch.setenv("LMCACHE_SGL_CACHE_DIR", str(tmp_path / "cache"))
    lib = cpu_mode.ensure_stub() / "libcuda.so.1"
    first = lib.stat().st_mtime_ns
    assert cpu_mode.ensure_stub() / "libcuda.so.1" == lib and lib.stat().st_mtime_ns == first
    src.write_text(src.read_text() + "\nint lmcache_sgl_stub_test_marker(void) { return 1; }\n")
    time.sleep(0.01)
    cpu_mode.ensure_stub()
    assert lib.stat().st_mtime_ns != first


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return models.make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


def test_stop_leaves_no_process(tiny_model, tmp_path):
    s = server.SGLangServer(tiny_model, extra_args=["--max-total-tokens", "2048"],
                            log_path=tmp_path / "server.log")
    s.start()
    pgid = s.proc.pid
    time.sleep(8)  # some children are up: kill mid-start-up
    s.stop()
    assert not server._group_alive(pgid)


def test_dead_server_reports_log_tail(tmp_path):
    s = server.SGLangServer(tmp_path / "no-such-model", log_path=tmp_path / "server.log")
    with s, pytest.raises(server.ServerError, match="exited with code"):
        s.wait_healthy(timeout=300)


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    plugin = _cpu_plugin_dir(root / "plugin")
    s = server.SGLangServer(
        tiny_model, extra_args=["--max-total-tokens", "4096", "--log-level", "info"],
        env_overrides={"PYTHONPATH": str(plugin)}, log_path=root / "server.log")
    with s:
        s.startup_s = s.wait_healthy(timeout=600)
        yield s
    assert s.proc is None


def test_generate_twice_hits_the_radix_cache(srv):
    rng = random.Random(1)
    ids = [rng.randrange(10, 2000) for _ in range(600)]
    first = srv.generate(ids, max_new_tokens=8)
    second = srv.generate(ids, max_new_tokens=8)
    assert len(first["output_ids"]) == 8
    assert second["output_ids"] == first["output_ids"]
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] > 0
    lp1 = [t[0] for t in first["meta_info"]["output_token_logprobs"]]
    lp2 = [t[0] for t in second["meta_info"]["output_token_logprobs"]]
    assert lp1 == pytest.approx(lp2, abs=0.05)

    srv.flush_cache()
    third = srv.generate(ids, max_new_tokens=8)
    assert third["meta_info"]["cached_tokens"] == 0
    assert third["output_ids"] == first["output_ids"]


def test_extend_hook_active_in_cpu_mode(srv):
    if not cpu_mode.wanted():
        pytest.skip("a GPU is present: CPU mode (and its hook) is off")
    log = srv.log_path.read_text(errors="replace")
    assert cpu_mode.HOOK_ACTIVE_LINE in log
