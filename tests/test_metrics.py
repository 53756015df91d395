"""CacheMetrics: names and labels are checked at the call; concurrent increments are exact."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
