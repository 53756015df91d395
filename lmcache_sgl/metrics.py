"""The project's one counter set (CacheMetrics), and its export to Prometheus.

Every series has a fixed name and a fixed label; a name, label or label value not in
the tables below raises at the call, so a typo cannot create a series. Exported names
carry the prefix `lmcache_sgl_`.

Export (install_exporter, with SGLang's --enable-metrics): SGLang serves /metrics from
its HTTP process while the cache lives in the scheduler process, so, like SGLang's own
scheduler metrics, ours are written with prometheus_client's multiprocess mode (files
under PROMETHEUS_MULTIPROC_DIR, which SGLang sets before it starts the scheduler).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

PREFIX = "lmcache_sgl_"
TIERS = ("cpu", "disk", "redis")
_REASON = re.compile(r"[a-z][a-z0-9_]*\Z")  # reasons are open-ended, but snake_case


@dataclass(frozen=True)
class Series:
    kind: str  # "counter", "histogram" or "gauge"
    label: str | None  # "tier", "reason" or None
    help: str


SERIES: dict[str, Series] = {
    "lookup_requested_tokens_total": Series("counter", None, "Prompt tokens looked up in the tiers"),
    "lookup_hit_tokens_total": Series("counter", "tier", "Looked-up tokens found, by the tier holding them"),
    "loaded_tokens_total": Series("counter", "tier", "Tokens loaded into SGLang's KV pool, by source tier"),
    "stored_chunks_total": Series("counter", "tier", "Chunks written into a tier"),
    "load_bytes_total": Series("counter", "tier", "Bytes read from a tier for loads"),
    "store_bytes_total": Series("counter", "tier", "Bytes written into a tier"),
    "evicted_chunks_total": Series("counter", "tier", "Chunks evicted from a tier"),
    "dropped_writes_total": Series("counter", "reason", "Stores given up, by reason"),
    "failed_loads_total": Series("counter", "reason", "Loads that failed (the request is recomputed), by reason"),
    "corrupt_frames_total": Series("counter", "tier", "Stored chunks that failed verification and were dropped"),
    "adapter_failures_total": Series(
        "counter", "reason", "Failures caught at the SGLang boundary (served without the tiers), by where"
    ),
    "blend_requests_total": Series(
        "counter", "reason", "Requests offered reused segments: blended, or why they were recomputed instead"
    ),
    "blend_reused_tokens_total": Series("counter", None, "Blended tokens whose reused KV was kept"),
    "blend_recomputed_tokens_total": Series("counter", None, "Blended tokens computed (gaps and picked tokens)"),
    "load_seconds": Series("histogram", None, "Duration of one load into the KV pool"),
    "store_seconds": Series("histogram", None, "Duration of one store from the KV pool"),
    "usage_bytes": Series("gauge", "tier", "Bytes a tier holds"),
    "capacity_bytes": Series("gauge", "tier", "Bytes a tier may hold"),
}
# Load and store times run from ~1 ms (a chunk in CPU memory) to seconds (many chunks from disk).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _check_label(name: str, label: str | None, value: str) -> None:
    if label == "tier" and value not in TIERS:
        raise ValueError(f"{name}: tier must be one of {TIERS}, not {value!r}")
    if label == "reason" and not _REASON.match(value):
        raise ValueError(f"{name}: reason must be a snake_case word, not {value!r}")


def _series(name: str, kind: str) -> Series:
    series = SERIES.get(name)
    if series is None or series.kind != kind:
        known = sorted(n for n, s in SERIES.items() if s.kind == kind)
        raise KeyError(f"unknown {kind} {name!r}; the {kind}s are {known}")
    return series


class Sink(Protocol):
    """Receives every increment and observation made after it is attached."""

    def inc(self, name: str, value: float, label: str | None) -> None: ...

    def observe(self, name: str, seconds: float) -> None: ...


class CacheMetrics:
    """The project's one counter set: counters, load/store histograms, tier gauges.

    Thread-safe; increments from several threads are exact. Counters only grow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str | None, float]] = {n: {} for n, s in SERIES.items() if s.kind == "counter"}
        self._histograms: dict[str, list[float]] = {n: [0, 0.0] for n, s in SERIES.items() if s.kind == "histogram"}
        self._read_gauges: Callable[[], dict[str, dict[str, float]]] | None = None
        self._sinks: tuple[Sink, ...] = ()

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        """Add `value` (>= 0) to counter `name`; its one label, if it has one, is required."""
        series = _series(name, "counter")
        expected = {series.label} if series.label else set()
        if set(labels) != expected:
            raise TypeError(f"{name} takes the labels {sorted(expected)}, not {sorted(labels)}")
        label = labels[series.label] if series.label else None
        if label is not None:
            _check_label(name, series.label, label)
        if value < 0:
            raise ValueError(f"{name}: a counter cannot decrease (got {value})")
        with self._lock:
            values = self._counters[name]
            values[label] = values.get(label, 0) + value
            sinks = self._sinks
        for sink in sinks:
            sink.inc(name, value, label)

    def observe(self, name: str, seconds: float) -> None:
        """Record one duration in histogram `name` (load_seconds, store_seconds)."""
        _series(name, "histogram")
        if not seconds >= 0:
            raise ValueError(f"{name}: a duration must be >= 0 (got {seconds})")
        with self._lock:
            histogram = self._histograms[name]
            histogram[0] += 1
            histogram[1] += seconds
            sinks = self._sinks
        for sink in sinks:
            sink.observe(name, seconds)

    def set_gauges(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Gauge values come from `read()` ({gauge: {tier: value}}), called whenever they are
        wanted (snapshot, export), possibly from another thread. It is called once now, so
        a bad name or tier raises here."""
        self._check_gauges(read())
        self._read_gauges = read

    def gauges(self) -> dict[str, dict[str, float]]:
        """The gauges' current values (empty until set_gauges)."""
        if self._read_gauges is None:
            return {}
        values = self._read_gauges()
        self._check_gauges(values)
        return values

    @staticmethod
    def _check_gauges(values: dict[str, dict[str, float]]) -> None:
        for name, by_tier in values.items():
            series = _series(name, "gauge")
            for tier in by_tier:
                _check_label(name, series.label, tier)

    def snapshot(self) -> dict:
        """Plain values: an unlabeled counter as a number, a labeled one as {label: value}
        (labels never incremented are absent), a histogram as {"count", "sum"}, gauges as
        {tier: value}. E.g. {"lookup_requested_tokens_total": 1024, "loaded_tokens_total":
        {"cpu": 512}, "load_seconds": {"count": 2, "sum": 0.01}, "usage_bytes": {"cpu": 4096}}."""
        with self._lock:
            out: dict = {
                name: values.get(None, 0) if SERIES[name].label is None else dict(values)
                for name, values in self._counters.items()
            }
            out.update({name: {"count": h[0], "sum": h[1]} for name, h in self._histograms.items()})
        gauges = self.gauges()
        out.update({name: dict(gauges.get(name, {})) for name, s in SERIES.items() if s.kind == "gauge"})
        return out

    def attach(self, sink: Sink) -> dict[str, dict[str | None, float]]:
        """Forward every later increment and observation to `sink` (from the calling
        thread). Returns the counters as they stood at that instant ({name: {label or
        None: value}}), so sink totals = returned values + forwarded increments, exactly."""
        with self._lock:
            self._sinks = (*self._sinks, sink)
            return {name: dict(values) for name, values in self._counters.items()}


log = logging.getLogger("lmcache_sgl")


class PrometheusExporter:
    """Writes a CacheMetrics into prometheus_client metrics named PREFIX + name, each with
    the constant `labels` (e.g. model_name, tp_rank) besides its own.

    Counters and histograms are written at each increment or observation (counters start
    from the totals at construction), gauges every `interval` seconds by a daemon thread.
    Gauges use multiprocess_mode "livesum": bytes held by distinct processes (TP ranks,
    DP replicas) add up. The metrics are not registered in any registry: in multiprocess
    mode SGLang's /metrics reads them from PROMETHEUS_MULTIPROC_DIR. A failing write is
    logged once and never reaches the caller (a load or store)."""

    def __init__(self, metrics: CacheMetrics, labels: dict[str, str], interval: float = 1.0) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._labels = dict(labels)
        names = list(self._labels)
        self._metrics = metrics
        self._prom: dict[str, Counter | Gauge | Histogram] = {}
        for name, s in SERIES.items():
            labelnames = names + ([s.label] if s.label else [])
            full = PREFIX + name
            if s.kind == "counter":
                self._prom[name] = Counter(full, s.help, labelnames, registry=None)
            elif s.kind == "histogram":
                self._prom[name] = Histogram(full, s.help, labelnames, registry=None, buckets=BUCKETS)
            else:
                self._prom[name] = Gauge(full, s.help, labelnames, registry=None, multiprocess_mode="livesum")
        self._failed = False
        for name, values in metrics.attach(self).items():
            for label, value in values.items():
                self.inc(name, value, label)
        self.export_gauges()
        threading.Thread(target=self._run, args=(interval,), name="lmcache-sgl-metrics", daemon=True).start()

    def _series(self, name: str, label: str | None):
        if label is None:
            return self._prom[name].labels(**self._labels)
        key = SERIES[name].label
        if key is None:
            raise ValueError(f"lmcache-sgl metric {name} takes no label")
        return self._prom[name].labels(**self._labels, **{key: label})

    def _failure(self) -> None:
        if not self._failed:
            self._failed = True
            log.exception("lmcache-sgl: writing Prometheus metrics failed (further failures are not logged)")

    def inc(self, name: str, value: float, label: str | None) -> None:
        try:
            self._series(name, label).inc(value)
        except Exception:
            self._failure()

    def observe(self, name: str, seconds: float) -> None:
        try:
            self._series(name, None).observe(seconds)
        except Exception:
            self._failure()

    def export_gauges(self) -> None:
        """Set the gauges to the CacheMetrics' current values."""
        try:
            for name, by_tier in self._metrics.gauges().items():
                for tier, value in by_tier.items():
                    self._series(name, tier).set(value)
        except Exception:
            self._failure()

    def _run(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.export_gauges()


def install_exporter(metrics: CacheMetrics) -> None:
    """In an SGLang scheduler process: export `metrics` when the server runs with
    --enable-metrics, from the schedulers that export SGLang's own scheduler metrics
    (attention TP rank 0, or all with --enable-metrics-for-all-schedulers), labeled
    model_name and tp_rank as those are. Otherwise (and without PROMETHEUS_MULTIPROC_DIR,
    where /metrics could not see them) a no-op."""
    from sglang.srt.runtime_context import get_observability, get_parallel, get_serving

    observability, parallel = get_observability(), get_parallel()
    if not observability.enable_metrics:
        return
    if (
        not (parallel.attn_tp_rank == 0 and parallel.attn_cp_rank == 0)
        and not observability.enable_metrics_for_all_schedulers
    ):
        return
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        log.warning("lmcache-sgl: PROMETHEUS_MULTIPROC_DIR is not set, so its metrics are not exported")
        return
    PrometheusExporter(metrics, {"model_name": str(get_serving().served_model_name), "tp_rank": str(parallel.tp_rank)})
