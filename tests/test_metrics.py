"""CacheMetrics: names and labels are checked at the call; concurrent increments are exact."""

import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from lmcache_sgl.metrics import CacheMetrics


def test_snapshot_holds_plain_values():
    m = CacheMetrics()
    m.inc("lookup_requested_tokens_total", 1024)
    m.inc("lookup_hit_tokens_total", 512, tier="cpu")
    m.inc("loaded_tokens_total", 256, tier="disk")
    m.inc("loaded_tokens_total", 256, tier="disk")
    m.inc("dropped_writes_total", reason="queue_full")
    m.observe("load_seconds", 0.25)
    m.observe("load_seconds", 0.5)
    snap = m.snapshot()
    assert snap["lookup_requested_tokens_total"] == 1024
    assert snap["lookup_hit_tokens_total"] == {"cpu": 512}
    assert snap["loaded_tokens_total"] == {"disk": 512}
    assert snap["dropped_writes_total"] == {"queue_full": 1}
    assert snap["stored_chunks_total"] == {}
    assert snap["load_seconds"] == {"count": 2, "sum": 0.75}
    assert snap["store_seconds"] == {"count": 0, "sum": 0.0}
    assert snap["usage_bytes"] == {} and snap["capacity_bytes"] == {}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: m.inc("loaded_tokens", 1, tier="cpu"), KeyError),  # name typo
        (lambda m: m.inc("load_seconds", 1), KeyError),  # a histogram is not a counter
        (lambda m: m.observe("load_bytes_total", 1.0), KeyError),
        (lambda m: m.inc("loaded_tokens_total", 1), TypeError),  # label missing
        (lambda m: m.inc("loaded_tokens_total", 1, teir="cpu"), TypeError),  # label typo
        (lambda m: m.inc("lookup_requested_tokens_total", 1, tier="cpu"), TypeError),  # no label there
        (lambda m: m.inc("loaded_tokens_total", 1, tier="cpy"), ValueError),  # tier typo
        (lambda m: m.inc("failed_loads_total", 1, reason="Not Found"), ValueError),
        (lambda m: m.inc("loaded_tokens_total", -1, tier="cpu"), ValueError),
        (lambda m: m.observe("store_seconds", -0.1), ValueError),
        (lambda m: m.observe("store_seconds", float("nan")), ValueError),
    ],
)
def test_bad_calls_raise_and_create_nothing(call, error):
    m = CacheMetrics()
    before = m.snapshot()
    with pytest.raises(error):
        call(m)
    assert m.snapshot() == before


def test_gauges_are_read_when_wanted_and_checked_at_set():
    m = CacheMetrics()
    usage = {"cpu": 0}
    m.set_gauges(lambda: {"usage_bytes": dict(usage), "capacity_bytes": {"cpu": 100, "disk": 200}})
    usage["cpu"] = 42
    assert m.snapshot()["usage_bytes"] == {"cpu": 42}
    assert m.gauges()["capacity_bytes"] == {"cpu": 100, "disk": 200}
    with pytest.raises(KeyError):
        m.set_gauges(lambda: {"usage": {"cpu": 1}})
    with pytest.raises(ValueError):
        m.set_gauges(lambda: {"usage_bytes": {"gpu": 1}})
    assert m.gauges()["usage_bytes"] == {"cpu": 42}  # the rejected readers were not kept


class RecordingSink:
    def __init__(self):
        self.incs, self.observations = [], []

    def inc(self, name, value, label):
        self.incs.append((name, value, label))

    def observe(self, name, seconds):
        self.observations.append((name, seconds))


def test_attach_returns_the_totals_so_far_and_forwards_what_follows():
    m = CacheMetrics()
    m.inc("stored_chunks_total", 3, tier="cpu")
    m.inc("lookup_requested_tokens_total", 10)
    m.observe("store_seconds", 0.1)
    sink = RecordingSink()
    start = m.attach(sink)
    assert start["stored_chunks_total"] == {"cpu": 3}
    assert start["lookup_requested_tokens_total"] == {None: 10}
    m.inc("stored_chunks_total", 2, tier="disk")
    m.inc("lookup_requested_tokens_total", 5)
    m.observe("store_seconds", 0.2)
    assert sink.incs == [("stored_chunks_total", 2, "disk"), ("lookup_requested_tokens_total", 5, None)]
    assert sink.observations == [("store_seconds", 0.2)]


increments = st.lists(
    st.tuples(st.sampled_from(["cpu", "disk"]), st.integers(min_value=0, max_value=1 << 40)), min_size=1, max_size=200
)


@settings(max_examples=30, deadline=None)
@given(per_thread=st.lists(increments, min_size=2, max_size=6), attach_after=st.integers(min_value=0, max_value=50))
def test_concurrent_increments_sum_exactly(per_thread, attach_after):
    """Threads increment at once (released by a barrier); one attaches a sink midway.
    The snapshot's totals equal the sums, and so do the sink's start values plus what it got."""
    m = CacheMetrics()
    sink = RecordingSink()
    start: dict = {}
    barrier = threading.Barrier(len(per_thread))

    def work(index, incs):
        barrier.wait()
        for i, (tier, value) in enumerate(incs):
            if index == 0 and i == min(attach_after, len(incs) - 1):
                start.update(m.attach(sink))
            m.inc("load_bytes_total", value, tier=tier)
            m.inc("lookup_requested_tokens_total", value)
            m.observe("load_seconds", 0.5)

    threads = [threading.Thread(target=work, args=(i, incs)) for i, incs in enumerate(per_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    expected = {tier: sum(v for incs in per_thread for t, v in incs if t == tier) for tier in ("cpu", "disk")}
    expected = {tier: v for tier, v in expected.items() if any(t == tier for incs in per_thread for t, _ in incs)}
    snap = m.snapshot()
    assert snap["load_bytes_total"] == expected
    assert snap["lookup_requested_tokens_total"] == sum(expected.values())
    count = sum(len(incs) for incs in per_thread)
    assert snap["load_seconds"] == {"count": count, "sum": 0.5 * count}

    forwarded = {tier: sum(v for n, v, t in sink.incs if n == "load_bytes_total" and t == tier) for tier in expected}
    assert {tier: start["load_bytes_total"].get(tier, 0) + forwarded[tier] for tier in expected} == expected
    forwarded_lookups = sum(v for n, v, _ in sink.incs if n == "lookup_requested_tokens_total")
    assert start["lookup_requested_tokens_total"].get(None, 0) + forwarded_lookups == sum(expected.values())


# ---- export to Prometheus (multiprocess mode, as in SGLang) ------------------------

WRITER = """
import sys, time
from lmcache_sgl.metrics import CacheMetrics, PrometheusExporter

m = CacheMetrics()
m.inc("stored_chunks_total", 2, tier="cpu")  # before the exporter exists
usage = {"cpu": 100}
m.set_gauges(lambda: {"usage_bytes": dict(usage), "capacity_bytes": {"cpu": 1000}})
PrometheusExporter(m, {"model_name": "tiny", "tp_rank": sys.argv[1]}, interval=0.05)
m.inc("stored_chunks_total", 3, tier="cpu")
m.inc("lookup_requested_tokens_total", 7)
m.inc("failed_loads_total", reason="missing")
m.observe("load_seconds", 0.003)
m.observe("load_seconds", 0.2)
usage["cpu"] = 300  # exported by the gauge thread
time.sleep(0.5)
print("done")
"""


def run_writer(multiproc_dir, tp_rank):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    return subprocess.run([sys.executable, "-c", WRITER, tp_rank], env=env, capture_output=True, text=True, timeout=60)


def scrape(multiproc_dir) -> dict:
    """What SGLang's /metrics serves from the directory: {(sample name, labels): value}."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def series(tp_rank, **labels):
    return frozenset({"model_name": "tiny", "tp_rank": tp_rank, **labels}.items())


def test_exported_series_from_several_processes(tmp_path):
    for tp_rank in ("0", "0", "1"):  # two processes with the same labels, one other rank
        done = run_writer(tmp_path, tp_rank)
        assert done.returncode == 0 and "done" in done.stdout, done.stderr
    got = scrape(tmp_path)
    assert got[("lmcache_sgl_stored_chunks_total", series("0", tier="cpu"))] == 10  # 2 before + 3 after, twice
    assert got[("lmcache_sgl_stored_chunks_total", series("1", tier="cpu"))] == 5
    assert got[("lmcache_sgl_lookup_requested_tokens_total", series("1"))] == 7
    assert got[("lmcache_sgl_failed_loads_total", series("1", reason="missing"))] == 1
    assert got[("lmcache_sgl_load_seconds_count", series("1"))] == 2
    assert got[("lmcache_sgl_load_seconds_sum", series("1"))] == pytest.approx(0.203)
    assert got[("lmcache_sgl_load_seconds_bucket", series("1", le="0.005"))] == 1
    assert got[("lmcache_sgl_load_seconds_bucket", series("1", le="0.25"))] == 2
    assert got[("lmcache_sgl_usage_bytes", series("0", tier="cpu"))] == 600  # livesum over the two processes
    assert got[("lmcache_sgl_usage_bytes", series("1", tier="cpu"))] == 300
    assert got[("lmcache_sgl_capacity_bytes", series("1", tier="cpu"))] == 1000
    assert not any(name.startswith("lmcache_sgl_store_seconds") and value for (name, _), value in got.items())


def test_a_failing_export_never_reaches_the_caller(tmp_path):
    done = run_writer(tmp_path / "missing", "0")  # the directory does not exist: every write fails
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    assert done.stderr.count("writing Prometheus metrics failed") == 1
