"""Configuration: LMCache's key names and units, strictly validated.

Sources, later ones winning: defaults, the YAML file (explicit path or
LMCACHE_CONFIG_FILE), then LMCACHE_<KEY> environment variables. An unknown key or a
bad value raises ConfigError naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn
from urllib.parse import urlsplit

import yaml

GB = 1024**3
MAX_GB = 2**20  # 1 PiB: beyond any host's memory or local disk; its bytes (2**50) are integers a float holds exactly
MAX_CHUNK_TOKENS = 2**24  # beyond any model's context length
MAX_SECONDS = threading.TIMEOUT_MAX  # the longest timeout threading's waits accept (more raises OverflowError)
REMOTE_SCHEMES = ("redis", "rediss", "unix", "redis-cluster", "rediss-cluster")
BLEND_STRATEGIES = ("reuse", "cacheblend", "boundary")


class ConfigError(ValueError):
    """A configuration key has a bad value, or is not a key at all."""


@dataclass(frozen=True)
class LMCacheConfig:
    chunk_size: int = 256  # tokens per chunk; a positive multiple of SGLang's page size
    local_cpu: bool = True  # keep chunks in the CPU tier
    max_local_cpu_size: float = 5.0  # GB of CPU memory for the CPU tier
    local_disk: str | None = None  # directory of the disk tier ("file://" prefix and ~ allowed)
    max_local_disk_size: float = 0.0  # GB the disk tier may use
    write_policy: str = (
        "write_through"  # write_through: every store also goes to disk; write_back: only CPU evictions do
    )
    disk_codec: str = "zstd"  # zstd (byte shuffle + zstd) or raw
    zstd_level: int = 1  # zstd level for disk frames
    save_unfull_chunk: bool = True  # also store the trailing partial chunk of a prefix
    save_on_checkpoint: bool = True  # store chunks as soon as computed (else only when SGLang evicts them)
    save_decode_cache: bool = False  # with save_on_checkpoint, store decode tokens' chunks too
    max_disk_write_delay: float = (
        5.0  # seconds a write_through chunk may wait for an idle server before it goes to disk anyway
    )
    max_write_queue_size: float = 1.0  # GB of chunk copies the asynchronous disk writer may hold in its queue
    shutdown_flush_timeout: float = 10.0  # seconds a stopping server waits for queued disk writes
    remote_url: str | None = (
        None  # the shared Redis tier: redis://, rediss://, unix://, redis-cluster://, rediss-cluster://
    )
    remote_serde: str = "naive"  # naive (raw frame) or zstd (the disk codec)
    remote_timeout: float = 0.5  # seconds any one wait on Redis may take
    remote_ttl: float = 0.0  # seconds a chunk lives in Redis (0: until the server evicts it)
    remote_key_prefix: str = "lmcsgl:"  # prefix of every Redis key, so several deployments share one Redis
    remote_hmac_key: str | None = None  # shared secret: every value carries an HMAC-SHA256 tag
    remote_hmac_key_file: str | None = None  # the shared secret from a file instead
    remote_tls_ca_file: str | None = None  # rediss: PEM CA bundle to verify the server
    remote_tls_cert_file: str | None = None  # rediss: PEM client certificate
    remote_tls_key_file: str | None = None  # rediss: PEM key of the client certificate
    enable_blending: bool = False  # reuse the KV of repeated segments anywhere in a prompt (approximate)
    blend_strategy: str = "cacheblend"  # reuse, cacheblend or boundary (see README)
    blend_recompute_ratios: float = 0.15  # cacheblend: fraction of reused tokens recomputed after the check layers
    blend_check_layers: tuple[int, ...] = (1,)  # cacheblend: layers whose KV deviation picks the tokens to recompute
    blend_boundary_tokens: int = 16  # boundary: leading tokens of each reused segment recomputed
    blend_special_str: str | None = " # # "  # segment separator; None or "": find stored spans by rolling hash
    blend_min_tokens: int = 16  # segments shorter than this are neither stored nor reused
    blend_segment_share: float = 0.5  # with blending: fraction of the CPU tier kept for segments

    @property
    def disk_path(self) -> str | None:
        if self.local_disk is None:
            return None
        return os.path.expanduser(self.local_disk.removeprefix("file://"))

    @property
    def cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB) if self.local_cpu else 0

    @property
    def disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB) if self.local_disk else 0

    @property
    def hmac_secret(self) -> bytes | None:
        """The shared secret of the Redis tier (remote_hmac_key, or the file's contents
        without a trailing newline); None without one."""
        if self.remote_hmac_key is not None:
            return self.remote_hmac_key.encode()
        if self.remote_hmac_key_file is not None:
            with open(os.path.expanduser(self.remote_hmac_key_file), "rb") as f:
                return f.read().rstrip(b"\r\n")
        return None

    def validated(self, page_size: int = 1, chunk_bytes: int | None = None) -> LMCacheConfig:
        """Return self after checking every value; raise ConfigError naming the first bad key.

        chunk_bytes, the bytes of one chunk where the caller knows them, also refuses a CPU
        tier too small to hold one chunk."""
        if page_size <= 0 or not 0 < self.chunk_size <= MAX_CHUNK_TOKENS or self.chunk_size % page_size:
            _bad(
                "chunk_size",
                self.chunk_size,
                f"must be a multiple of the page size {page_size} in 1..{MAX_CHUNK_TOKENS}",
            )
        for key, above_zero, high in (
            ("max_local_cpu_size", False, MAX_GB),
            ("max_local_disk_size", False, MAX_GB),
            ("max_disk_write_delay", True, MAX_SECONDS),
            ("max_write_queue_size", True, MAX_GB),
            ("shutdown_flush_timeout", False, MAX_SECONDS),
            ("remote_timeout", True, MAX_SECONDS),
            ("remote_ttl", False, MAX_SECONDS),
        ):
            value = getattr(self, key)
            if not (0 < value if above_zero else 0 <= value) or not value <= high:  # NaN fails both
                _bad(key, value, f"must be {'>' if above_zero else '>='} 0 and <= {high}")
        if self.write_policy not in ("write_back", "write_through"):
            _bad("write_policy", self.write_policy, "must be write_back or write_through")
        if self.disk_codec not in ("zstd", "raw"):
            _bad("disk_codec", self.disk_codec, "must be zstd or raw")
        if not 1 <= self.zstd_level <= 22:
            _bad("zstd_level", self.zstd_level, "must be in 1..22")
        if self.local_disk is not None:
            if self.max_local_disk_size <= 0:
                _bad("max_local_disk_size", self.max_local_disk_size, "must be positive when local_disk is set")
            _check_writable_dir(self.disk_path or "")
        if self.save_decode_cache and not self.save_on_checkpoint:
            _bad("save_decode_cache", True, "has no effect unless 'save_on_checkpoint' is true")
        self._check_remote()
        self._check_blending()
        if chunk_bytes is not None and self.local_cpu and self.cpu_bytes < chunk_bytes:
            # chunk_bytes / GB is exact in a float and in 30 decimals, so the stated minimum is accepted
            smallest = f"{chunk_bytes / GB:.30f}".rstrip("0").rstrip(".")
            _bad(
                "max_local_cpu_size",
                self.max_local_cpu_size,
                f"must hold one chunk with local_cpu: at least {smallest} GB",
            )
        return self

    def _check_remote(self) -> None:
        tls_keys = ("remote_tls_ca_file", "remote_tls_cert_file", "remote_tls_key_file")
        if self.remote_url is None:
            for key in ("remote_hmac_key", "remote_hmac_key_file", *tls_keys):
                if getattr(self, key) is not None:
                    _bad(key, "<set>", "has no effect unless 'remote_url' is set")
            return
        _check_remote_url(self.remote_url)
        if self.remote_serde not in ("naive", "zstd"):
            _bad("remote_serde", self.remote_serde, "must be naive or zstd")
        if (
            not self.remote_key_prefix.isprintable()
            or " " in self.remote_key_prefix
            or len(self.remote_key_prefix) > 256
        ):
            _bad("remote_key_prefix", self.remote_key_prefix, "must be at most 256 printable characters without spaces")
        if self.remote_hmac_key is not None and self.remote_hmac_key_file is not None:
            _bad("remote_hmac_key_file", self.remote_hmac_key_file, "and 'remote_hmac_key' are both set; set one")
        if self.remote_hmac_key == "":
            _bad("remote_hmac_key", "", "must not be empty")
        if self.remote_hmac_key_file is not None:
            try:
                secret = self.hmac_secret
            except OSError as e:
                _bad("remote_hmac_key_file", self.remote_hmac_key_file, f"cannot be read ({e.strerror or e})")
            if not secret:
                _bad("remote_hmac_key_file", self.remote_hmac_key_file, "holds no secret")
        tls = self.remote_url.startswith("rediss")
        for key in tls_keys:
            path = getattr(self, key)
            if path is None:
                continue
            if not tls:
                _bad(key, path, "needs a rediss:// or rediss-cluster:// 'remote_url'")
            if not os.access(os.path.expanduser(path), os.R_OK):
                _bad(key, path, "is not a readable file")
        if (self.remote_tls_cert_file is None) != (self.remote_tls_key_file is None):
            _bad("remote_tls_key_file", self.remote_tls_key_file, "and 'remote_tls_cert_file' must be set together")

    def _check_blending(self) -> None:
        if self.blend_strategy not in BLEND_STRATEGIES:
            _bad("blend_strategy", self.blend_strategy, f"must be one of {', '.join(BLEND_STRATEGIES)}")
        if not 0 <= self.blend_recompute_ratios <= 1:
            _bad("blend_recompute_ratios", self.blend_recompute_ratios, "must be in 0..1")
        if not self.blend_check_layers or any(layer < 0 for layer in self.blend_check_layers):
            _bad("blend_check_layers", list(self.blend_check_layers), "must be a non-empty list of layers >= 0")
        for key, low in (("blend_boundary_tokens", 0), ("blend_min_tokens", 1)):
            if not low <= getattr(self, key) <= MAX_CHUNK_TOKENS:
                _bad(key, getattr(self, key), f"must be in {low}..{MAX_CHUNK_TOKENS}")
        if not 0 < self.blend_segment_share < 1:
            _bad("blend_segment_share", self.blend_segment_share, "must be > 0 and < 1")

    @property
    def blend_separator(self) -> str | None:
        """The segment separator, or None: segments are found by rolling hash."""
        return self.blend_special_str or None


def _check_remote_url(url: str) -> None:
    """Refuse a remote_url that names no server; the message never shows a password."""
    parts = urlsplit(url)
    shown = url if parts.password is None else url.replace(f":{parts.password}@", ":***@", 1)
    if parts.scheme not in REMOTE_SCHEMES:
        _bad("remote_url", shown, f"must start with one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    if parts.scheme == "unix":
        if not parts.path:
            _bad("remote_url", shown, "must name a socket path: unix:///path/to/redis.sock")
        return
    for node in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = node.rpartition(":") if ":" in node else (node, "", "")
        if parts.scheme.endswith("-cluster") and not (host and port.isdigit()):
            _bad("remote_url", shown, f"cluster node {node!r} is not host:port")
        if not host or (port and not port.isdigit()) or not 0 < int(port or 6379) < 65536:
            _bad("remote_url", shown, "must name host[:port]")
    if "," in parts.netloc and not parts.scheme.endswith("-cluster"):
        _bad("remote_url", shown, "lists several nodes: use redis-cluster://")


def _bad(key: str, value: Any, why: str) -> NoReturn:
    try:
        shown = repr(value)
    except ValueError:  # an int of over 4300 digits
        shown = f"<an int of {value.bit_length()} bits>"
    raise ConfigError(f"lmcache config key {key!r} = {shown}: {why}")


def _check_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        _bad("local_disk", path, f"is not a writable directory ({getattr(e, 'strerror', None) or e})")


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps an integer of over 4300 digits (too long for int()) as its
    text, so that it is refused naming its key."""


def _int_or_text(loader: _Loader, node: yaml.ScalarNode) -> Any:
    try:
        return loader.construct_yaml_int(node)
    except ValueError:
        return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_text)

_FIELD_TYPES = {f.name: f.type for f in fields(LMCacheConfig)}


def _coerce(key: str, value: Any, from_env: bool) -> Any:
    kind = _FIELD_TYPES[key]
    if value is None and "None" in kind:
        return None
    if kind.startswith("tuple[int"):
        return _int_list(key, value, from_env)
    if kind == "float" and isinstance(value, list) and len(value) == 1:
        value = value[0]  # LMCache writes blend_recompute_ratios as a list of one ratio
    if from_env:
        if "bool" in kind:
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            _bad(key, value, "must be a boolean")
        if kind in ("int", "float"):
            try:
                return int(value) if kind == "int" else float(value)
            except ValueError:
                _bad(key, value, f"must be {'an integer' if kind == 'int' else 'a number'}")
        return value
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(kind.split(" ")[0], isinstance(value, str))
    if not ok:
        _bad(key, value, f"must be of type {kind}")
    if kind == "float":
        try:
            return float(value)
        except OverflowError:
            _bad(key, value, "is too large")
    return value


def _int_list(key: str, value: Any, from_env: bool) -> tuple[int, ...]:
    """A list of integers: a YAML list, or "1,2" from the environment."""
    items = str(value).replace(" ", "").split(",") if from_env else value
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    try:
        if not isinstance(items, list) or any(isinstance(i, (bool, float)) for i in items):
            raise ValueError
        return tuple(int(i) for i in items)
    except (ValueError, TypeError):
        _bad(key, value, "must be a list of integers")


def config_from_mapping(values: Mapping[str, Any], *, from_env: bool = False) -> dict[str, Any]:
    """Checked and typed values of `values`; unknown keys raise ConfigError."""
    out = {}
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            _bad(str(key), value, f"is not a known key (known: {', '.join(sorted(_FIELD_TYPES))})")
        out[key] = _coerce(key, value, from_env)
    return out


def load_config(
    path: str | None = None,
    *,
    page_size: int = 1,
    environ: Mapping[str, str] | None = None,
    chunk_bytes: int | None = None,
) -> LMCacheConfig:
    """Defaults < YAML file (`path` or LMCACHE_CONFIG_FILE) < LMCACHE_<KEY> variables,
    validated with `page_size` and `chunk_bytes` (see LMCacheConfig.validated)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("LMCACHE_CONFIG_FILE")
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                loaded = yaml.load(f, _Loader)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read lmcache config file {path!r}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"lmcache config file {path!r} must hold a mapping of keys to values")
        values.update(config_from_mapping(loaded or {}))
    env = {k: environ[f"LMCACHE_{k.upper()}"] for k in _FIELD_TYPES if f"LMCACHE_{k.upper()}" in environ}
    values.update(config_from_mapping(env, from_env=True))
    return dataclasses.replace(LMCacheConfig(), **values).validated(page_size, chunk_bytes)
