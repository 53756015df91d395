"""Redis tier: a cold tier shared by every instance that points at the same Redis.

One value per chunk, `<remote_key_prefix><key hex>`: the chunk's self-describing,
checksummed frame (codec.py; `naive` = raw, `zstd` = the disk codec), followed, when a
shared secret is configured, by an HMAC-SHA256 tag over the whole frame. A value that
is absent, cut, altered, written for another key or layout, or without the right tag is
a miss, counted in `corrupt_frames_total{tier="redis"}` (rejected); it is never deleted
(the next store of the chunk overwrites it); so is a frame of an earlier version. The
frame holds the chunk's position.

Every call to Redis is a pipeline (one round trip per server, never one per chunk):
count_present sends one EXISTS per key, reading() one GET per key, writes one SET (with
PX when `remote_ttl` is set) per chunk from the tier's AsyncWriter, off the scheduler's
path. With `redis-cluster://` the keys are grouped by the master that owns their slot,
one pipeline per master; no multi-key command is sent. Every socket wait is bounded by
`remote_timeout`; a server that fails (refused, reset, timed out, cluster slot lost) is
skipped without any network call for a backoff (0.25 s doubling to 5 s), then tried
again, so a dead or hung Redis costs a request at most one timeout, and its chunks are
misses. The first failure is a warning, later ones are rate-limited, recovery is logged.

Redis cannot pin: protect() names the keys this instance has seen present, a load that
finds one gone is a miss and the tokens are recomputed. Capacity is the server's
(`maxmemory` with an eviction policy: one order for every chunk, the CPU tier's lanes are
not kept here); usage() reports its INFO memory figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException
from redis.retry import Retry

from ..codec import ChunkLayout, FrameError, decode_into, encode
from ..config import REMOTE_SCHEMES as SCHEMES
from ..lograte import RateLimitedLog
from ..metrics import CacheMetrics
from .base import Held, Payload
from .resp import get_values
from .writer import AsyncWriter, IdleSignal

log = logging.getLogger("lmcache_sgl")
SERDES = {"naive": "raw", "zstd": "zstd"}  # remote_serde -> frame codec
TAG_BYTES = hashlib.sha256().digest_size
BACKOFF_S, MAX_BACKOFF_S = 0.25, 5.0
KNOWN_KEYS = 1 << 16  # keys remembered as present (a hint for contains/protect), LRU
USAGE_REFRESH_S = 5.0
WRITE_BATCH = 16  # chunks whose SETs share one pipeline
# RedisClusterException (no startup node reachable, a slot no master covers) is no RedisError.
_FAILURES = (redis.ConnectionError, redis.TimeoutError, ClusterError, RedisClusterException, OSError)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for rediss:// (None: the system's CA store, no client certificate)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class _Server:
    """One Redis server (the only one, or one cluster master) and its health: after a
    failure it is skipped, without a network call, until its backoff has passed."""

    def __init__(self, label: str, client: redis.Redis, errors: RateLimitedLog) -> None:
        self.label, self.client, self._errors = label, client, errors
        self._down_until = 0.0
        self._backoff = 0.0  # 0 while healthy
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def run(self, commands: Sequence[tuple]) -> list | None:
        """The replies of `commands` sent as one pipeline (a reply may be an exception
        for that command); None, at once, while backing off, or if the server failed."""

        def pipeline() -> list:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=False)

        return self._call(pipeline) if commands else []

    def get(self, rkeys: Sequence[bytes]) -> list | None:
        """run() of one GET per key, the values read straight into arrays (resp.py)."""
        return self._call(lambda: get_values(self.client, rkeys)) if rkeys else []

    def _call(self, exchange) -> list | None:
        if not self.up:
            return None
        try:
            replies = exchange()
        except Exception as e:  # refused, reset, timed out, TLS or AUTH refused: never raised to the caller
            self._failed(e)
            return None
        if self._backoff:
            with self._lock:
                self._backoff, self._down_until = 0.0, 0.0
            log.warning("lmcache-sgl redis tier: %s answers again", self.label)
        return replies

    def _failed(self, e: Exception) -> None:
        with self._lock:
            first = not self._backoff
            self._backoff = min(MAX_BACKOFF_S, self._backoff * 2 or BACKOFF_S)
            self._down_until = time.monotonic() + self._backoff
        if first:
            self._errors.warn(
                f"down {self.label}", "%s failed (%r): its chunks are misses; retrying with backoff", self.label, e
            )
        else:
            self._errors.warn(f"down {self.label}", "%s still failing (%r)", self.label, e)


class RedisTier:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        serde: str = "naive",
        level: int = 1,
        timeout_s: float = 0.5,
        ttl_s: float | None = None,
        key_prefix: str = "lmcsgl:",
        hmac_key: bytes | None = None,
        tls: TlsFiles = TlsFiles(),
        idle: IdleSignal | None = None,
        max_queue_bytes: int = 1 << 30,
        max_delay_s: float = 5.0,
        metrics: CacheMetrics | None = None,
    ) -> None:
        """`url`: redis://[user:password@]host:port/db, rediss://..., unix://path[?db=n],
        redis-cluster://host:port[,host:port...] (rediss-cluster:// with TLS). Connects
        lazily: an unreachable server at start is an outage, not an error. Raises
        ValueError for a URL it cannot parse."""
        self.url, self.codec, self.level = url, SERDES[serde], level
        self.serde, self.timeout_s, self.ttl_s, self.key_prefix = serde, timeout_s, ttl_s, key_prefix
        self._hmac_key = hmac_key
        self.metrics = metrics if metrics is not None else CacheMetrics()
        self._errors = RateLimitedLog(log, "lmcache-sgl redis tier")
        self._known: OrderedDict[bytes, None] = OrderedDict()  # keys seen present, LRU
        self._protected: dict[bytes, int] = {}
        self._batch: dict[bytes, bytes | None] = {}  # values fetched by reading(), until it exits
        self._lock = threading.Lock()
        self._usage = (0, 0)
        self._usage_at = -USAGE_REFRESH_S
        self._route = _Routing(url, timeout_s, tls, self._errors)
        self.writer = AsyncWriter(
            self._write,
            max_batch=WRITE_BATCH,
            name="redis",
            idle=idle,
            max_bytes=max_queue_bytes,
            max_delay_s=max_delay_s,
            on_drop=lambda reason: self.metrics.inc("dropped_writes_total", reason=reason),
        )

    # ---- keys and local knowledge -------------------------------------------------
    def _rkey(self, key: bytes) -> bytes:
        return self.key_prefix.encode() + key.hex().encode()

    def _remember(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._known[key] = None
                self._known.move_to_end(key)
            while len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._known.pop(key, None)

    def __contains__(self, key: bytes) -> bool:
        """Whether this instance has seen the chunk in Redis, or is writing it (no network call)."""
        return key in self._known or self.writer.pending(key)

    def _fetch(self, command: str, keys: Sequence[bytes]) -> list:
        """`command` (EXISTS or GET) for each key, one pipeline per server; None for a
        key whose server failed or answered an error."""
        out: list = [None] * len(keys)
        all_rkeys = [self._rkey(k) for k in keys]
        for server, idx in self._route.group(all_rkeys):
            if server is None:
                continue
            rkeys = [all_rkeys[i] for i in idx]
            replies = server.get(rkeys) if command == "GET" else server.run([(command, k) for k in rkeys])
            if replies is None:
                continue
            for i, reply in zip(idx, replies, strict=False):  # a reply missing stays None: a miss
                out[i] = None if isinstance(reply, Exception) else reply
            if any(isinstance(r, redis.ResponseError) and str(r).startswith(("MOVED", "ASK")) for r in replies):
                self._route.refresh()  # slots moved (resharding, failover): their keys were misses this time
        return out

    def count_present(self, keys: Sequence[bytes]) -> int:
        """Leading keys present, from the current reading() batch where it has them, else
        from one pipelined EXISTS per server (a key on a failing server is absent)."""
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._batch:
                if self._batch[keys[n]] is None:
                    return n
                n += 1
        rest = keys[n:]
        if not rest:
            return n
        found = self._fetch("EXISTS", rest)
        lead = next((i for i, f in enumerate(found) if not f), len(rest))
        self._remember(rest[:lead])
        return n + lead

    def protect(self, keys: Sequence[bytes]) -> Held:
        """Names the keys seen present; Redis itself may still evict them (a later miss)."""
        with self._lock:
            held = tuple(k for k in keys if k in self._known)
            for k in held:
                self._protected[k] = self._protected.get(k, 0) + 1
        return Held(held)

    def unprotect(self, held: Held) -> None:
        with self._lock:
            for k in held.keys:
                left = self._protected.get(k, 0) - 1
                if left > 0:
                    self._protected[k] = left
                else:
                    self._protected.pop(k, None)

    # ---- reads ----------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, keys: Sequence[bytes]) -> Iterator[None]:
        """Fetch every key's value now, one pipelined GET per server; get_into and
        count_present use them until the context exits, when they are dropped."""
        keys = list(dict.fromkeys(keys))
        values = self._fetch("GET", keys) if keys else []
        with self._lock:
            self._batch.update(zip(keys, values, strict=True))
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    self._batch.pop(key, None)

    def get_into(self, key: bytes, layout: ChunkLayout, out: torch.Tensor, *, parallel: bool = True) -> int | None:
        """See ColdTier.get_into: the value from the current reading() batch, or one GET."""
        with self._lock:
            batched = key in self._batch
            value = self._batch.pop(key, None)
        if not batched:
            value = self._fetch("GET", [key])[0]
        if value is None:
            self._forget(key)
            return None
        try:
            position = decode_into(self._open(value), key, layout, out, parallel=parallel)
        except FrameError as e:
            self._forget(key)
            self.metrics.inc("corrupt_frames_total", tier=self.name)
            self._errors.warn("rejected", "rejected the value of %s: %s", self._rkey(key).decode(), e)
            return None
        self._remember([key])
        return position

    def _open(self, value: bytes) -> memoryview:
        """The frame inside a stored value; FrameError if its HMAC tag is missing or wrong."""
        view = memoryview(value)
        if self._hmac_key is None:
            return view
        if len(view) < TAG_BYTES:
            raise FrameError("value is shorter than an HMAC tag")
        frame, tag = view[:-TAG_BYTES], view[-TAG_BYTES:]
        if not hmac.compare_digest(hmac.new(self._hmac_key, frame, hashlib.sha256).digest(), tag):
            raise FrameError("HMAC-SHA256 tag does not match (no secret, another secret, or altered)")
        return frame

    # ---- writes ---------------------------------------------------------------
    def put(self, key: bytes, layout: ChunkLayout, data: Payload) -> bool:
        if key in self._known:
            data.release()
            return False
        return self.writer.submit(key, layout, data)

    def _value(self, key: bytes, layout: ChunkLayout, data: Payload) -> bytes:
        value = b"".join(encode(key, layout, data.tensor, self.codec, self.level, position=data.position))
        if self._hmac_key is not None:
            value += hmac.new(self._hmac_key, value, hashlib.sha256).digest()
        return value

    def _write(self, items: list[tuple[bytes, ChunkLayout, Payload]]) -> None:
        """The writer's sink: encode each chunk, then one pipeline of SETs (with PX =
        remote_ttl) per server."""
        rkeys = [self._rkey(key) for key, _, _ in items]
        for server, idx in self._route.group(rkeys):
            if server is None or not server.up:
                self.metrics.inc("dropped_writes_total", len(idx), reason="redis_down")
                continue
            ttl = () if self.ttl_s is None else ("PX", max(1, round(self.ttl_s * 1000)))
            replies = server.run([("SET", rkeys[i], self._value(*items[i]), *ttl) for i in idx])
            for n, i in enumerate(idx):
                reply = None if replies is None else replies[n]
                if reply is None or isinstance(reply, Exception):
                    if reply is not None:
                        self._errors.warn("refused", "a SET was refused: %s", reply)
                    self.metrics.inc(
                        "dropped_writes_total", reason="redis_down" if replies is None else "redis_refused"
                    )
                    continue
                key, layout, _ = items[i]
                self._remember([key])
                self.metrics.inc("stored_chunks_total", tier=self.name)
                self.metrics.inc("store_bytes_total", layout.nbytes, tier=self.name)

    def flush(self, timeout: float | None = None) -> bool:
        return self.writer.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        done = self.writer.close(timeout)
        self._route.close()
        return done

    # ---- whole tier -------------------------------------------------------------
    def clear(self) -> None:
        """Delete every unprotected chunk under this tier's key prefix (on every master,
        for every instance sharing the prefix), scanning and unlinking in pipelines."""
        self.flush()
        with self._lock:
            keep = {self._rkey(k) for k in self._protected}
            self._known = OrderedDict((k, None) for k in self._protected)
        pattern = _glob_escape(self.key_prefix) + "*"
        for server in self._route.servers():
            if not server.up:
                continue
            try:
                doomed = [k for k in server.client.scan_iter(match=pattern, count=1000) if k not in keep]
            except _FAILURES as e:
                server._failed(e)
                continue
            for i in range(0, len(doomed), 1000):
                server.run([("UNLINK", k) for k in doomed[i : i + 1000]])

    def usage(self) -> tuple[int, int]:
        """(used_memory, maxmemory) summed over the servers, from INFO memory refreshed at
        most every USAGE_REFRESH_S; the last figures while a server fails."""
        now = time.monotonic()
        if now - self._usage_at >= USAGE_REFRESH_S:
            self._usage_at = now
            used = capacity = 0
            for server in self._route.servers():
                replies = server.run([("INFO", "memory")])
                if replies is None or isinstance(replies[0], Exception):
                    return self._usage
                used += int(replies[0].get("used_memory", 0))
                capacity += int(replies[0].get("maxmemory", 0))
            self._usage = (used, capacity)
        return self._usage

    def describe(self) -> str:
        ttl = "none" if self.ttl_s is None else f"{self.ttl_s:g} s"
        return (
            f"redis {_redacted(self.url)} (serde {self.serde}, prefix {self.key_prefix!r}, ttl {ttl}, "
            f"timeout {self.timeout_s:g} s, hmac {'on' if self._hmac_key is not None else 'off'})"
        )


class _Routing:
    """Which server holds a key: the one server, or the cluster master owning its slot
    (the slot map of redis-py's cluster client, reloaded after a MOVED reply)."""

    def __init__(self, url: str, timeout_s: float, tls: TlsFiles, errors: RateLimitedLog) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"remote_url scheme must be one of {', '.join(SCHEMES)}: {_redacted(url)}")
        self.cluster = parts.scheme.endswith("-cluster")
        self._errors = errors
        self._kwargs: dict[str, Any] = dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            protocol=2,  # RESP2, which resp.get_values parses (redis-py 8 defaults to RESP3)
            retry=Retry(NoBackoff(), 1, (redis.ConnectionError,)),  # a stale pooled socket: reconnect once
        )
        if parts.scheme.startswith("rediss"):
            self._kwargs.update(ssl_ca_certs=tls.ca, ssl_certfile=tls.cert, ssl_keyfile=tls.key)  # rediss: TLS
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        if not self.cluster:
            client = redis.Redis.from_url(url, **self._kwargs)
            self._single: _Server | None = _Server(_redacted(url), client, errors)
            self._cluster_client: RedisCluster | None = None
            return
        self._single = None
        del self._kwargs["retry"]  # the cluster client refuses it; its node clients never retry
        userinfo, _, nodes = parts.netloc.rpartition("@")
        self._startup = [_host_port(hp) for hp in nodes.split(",")]
        host, port = self._startup[0]
        # Node clients get the timeouts, TLS files and credentials only from a URL'd client.
        self._first_url = (
            f"{parts.scheme.removesuffix('-cluster')}://{userinfo + '@' if userinfo else ''}{host}:{port}/0"
        )
        self._cluster_client = None
        self._next_init = 0.0
        self._init_backoff = 0.0

    def _topology(self) -> RedisCluster | None:
        """The cluster client, created on first use (with backoff while no startup node answers)."""
        with self._lock:
            if self._cluster_client is not None or time.monotonic() < self._next_init:
                return self._cluster_client
            try:
                self._cluster_client = RedisCluster(
                    url=self._first_url,
                    startup_nodes=[ClusterNode(h, p) for h, p in self._startup[1:]],
                    require_full_coverage=False,
                    cluster_error_retry_attempts=0,
                    **self._kwargs,
                )
                self._init_backoff = 0.0
            except (*_FAILURES, redis.RedisError) as e:
                self._init_backoff = min(MAX_BACKOFF_S, self._init_backoff * 2 or BACKOFF_S)
                self._next_init = time.monotonic() + self._init_backoff
                self._errors.warn("cluster", "no cluster node answers (%r); retrying with backoff", e)
            return self._cluster_client

    def _node_server(self, rc: RedisCluster, node: ClusterNode) -> _Server:
        with self._lock:
            server = self._servers.get(node.name)
            if server is None:
                server = self._servers[node.name] = _Server(
                    f"cluster master {node.name}", rc.get_redis_connection(node), self._errors
                )
            return server

    def server_of(self, rkey: bytes) -> _Server | None:
        if self._single is not None:
            return self._single
        rc = self._topology()
        if rc is None:
            return None
        try:
            return self._node_server(rc, rc.get_node_from_key(rkey))
        except (*_FAILURES, redis.RedisError):  # a slot no master covers
            return None

    def group(self, rkeys: Sequence[bytes]) -> list[tuple[_Server | None, list[int]]]:
        """The indexes of `rkeys` grouped by server (None: no server covers them)."""
        if self._single is not None:
            return [(self._single, list(range(len(rkeys))))]
        groups: dict[_Server | None, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            groups.setdefault(self.server_of(rkey), []).append(i)
        return list(groups.items())

    def refresh(self) -> None:
        """Reload the slot map (after a MOVED reply)."""
        rc = self._topology()
        if rc is not None:
            try:
                rc.nodes_manager.initialize()
            except (*_FAILURES, redis.RedisError) as e:
                self._errors.warn("cluster", "reloading the slot map failed (%r)", e)

    def servers(self) -> list[_Server]:
        if self._single is not None:
            return [self._single]
        rc = self._topology()
        return [] if rc is None else [self._node_server(rc, n) for n in rc.get_primaries()]

    def close(self) -> None:
        if self._single is not None:
            self._single.client.close()
        elif self._cluster_client is not None:
            self._cluster_client.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"remote_url cluster node {text!r} is not host:port")
    return host.strip("[]"), int(port)


def _redacted(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
