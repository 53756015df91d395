import dataclasses
import re
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl.config import GB, ConfigError, LMCacheConfig, load_config

KEYS = [f.name for f in dataclasses.fields(LMCacheConfig)]
NUMBER_KEYS = [f.name for f in dataclasses.fields(LMCacheConfig) if f.type in ("int", "float")]
FLOAT_KEYS = [f.name for f in dataclasses.fields(LMCacheConfig) if f.type == "float"]


def write(tmp_path, values):
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_are_lmcache_units():
    cfg = load_config(environ={})
    assert cfg == LMCacheConfig()
    assert cfg.chunk_size == 256 and cfg.cpu_bytes == 5 * 1024**3 and cfg.disk_path is None
    assert (cfg.max_disk_write_delay, cfg.max_write_queue_size, cfg.shutdown_flush_timeout) == (5.0, 1.0, 10.0)


def test_readme_table_lists_every_key_with_its_default():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", readme, re.MULTILINE))
    def show(value):
        if value in (None, True, False):
            return str(value).lower()
        if isinstance(value, tuple):
            return str(list(value))
        return f'"{value}"' if isinstance(value, str) and value != value.strip() else str(value)

    shown = {f.name: show(f.default) for f in dataclasses.fields(LMCacheConfig)}
    assert rows == shown


def test_file_then_env_override(tmp_path):
    disk = tmp_path / "disk"
    path = write(tmp_path, {"chunk_size": 64, "local_disk": f"file://{disk}", "max_local_disk_size": 1.5})
    cfg = load_config(environ={"LMCACHE_CONFIG_FILE": path, "LMCACHE_CHUNK_SIZE": "128", "LMCACHE_LOCAL_CPU": "false"})
    assert cfg.chunk_size == 128 and cfg.local_cpu is False and cfg.cpu_bytes == 0
    assert cfg.disk_path == str(disk) and cfg.disk_bytes == int(1.5 * 1024**3) and disk.is_dir()


def test_largest_values_are_accepted(tmp_path):
    values = {"chunk_size": 2**24, "max_local_cpu_size": 2**20, "max_write_queue_size": 2**20,
              "max_disk_write_delay": threading.TIMEOUT_MAX, "shutdown_flush_timeout": 0, "zstd_level": 22}
    cfg = load_config(write(tmp_path, values), page_size=16, environ={})
    assert cfg.cpu_bytes == 2**50 and cfg.shutdown_flush_timeout == 0.0


@pytest.mark.parametrize(
    "values, key",
    [
        ({"chunk_size": "256"}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 100}, "chunk_size"),  # not a multiple of page size 16
        ({"chunk_size": 2**24 + 16}, "chunk_size"),
        ({"max_local_cpu_size": -1}, "max_local_cpu_size"),
        ({"max_local_cpu_size": 2**20 + 1}, "max_local_cpu_size"),
        ({"max_local_disk_size": 10**400}, "max_local_disk_size"),  # too large for a float
        ({"local_cpu": "yes"}, "local_cpu"),
        ({"write_policy": "sometimes"}, "write_policy"),
        ({"disk_codec": "lz4"}, "disk_codec"),
        ({"zstd_level": 23}, "zstd_level"),
        ({"zstd_level": 10**30}, "zstd_level"),
        ({"local_disk": "/proc/lmcache", "max_local_disk_size": 1}, "local_disk"),
        ({"local_disk": "/tmp/x\0y", "max_local_disk_size": 1}, "local_disk"),
        ({"local_disk": "/tmp/x", "max_local_disk_size": 0}, "max_local_disk_size"),
        ({"max_disk_write_delay": 0}, "max_disk_write_delay"),
        ({"max_disk_write_delay": threading.TIMEOUT_MAX * 2}, "max_disk_write_delay"),
        ({"max_write_queue_size": 0}, "max_write_queue_size"),
        ({"max_write_queue_size": 2**21}, "max_write_queue_size"),
        ({"shutdown_flush_timeout": -1}, "shutdown_flush_timeout"),
        ({"shutdown_flush_timeout": 1e300}, "shutdown_flush_timeout"),
    ],
)
def test_bad_values_name_the_key(tmp_path, values, key):
    with pytest.raises(ConfigError, match=repr(key)) as e:
        load_config(write(tmp_path, values), page_size=16, environ={})
    assert "not a known key" not in str(e.value)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'chunk_sizee' = 256: is not a known key"):
        load_config(write(tmp_path, {"chunk_sizee": 256}), environ={})


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(write(tmp_path, {key: value}), environ={})


@pytest.mark.parametrize("key", NUMBER_KEYS)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "9" * 5000])
def test_non_finite_or_huge_env_numbers_name_the_key(key, text):
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(environ={f"LMCACHE_{key.upper()}": text})


@pytest.mark.parametrize("key", ["chunk_size", "max_local_cpu_size"])
@pytest.mark.parametrize("number", ["9" * 5000, "0x" + "f" * 5000])  # over Python's 4300-digit int limit
def test_huge_yaml_integers_name_the_key(tmp_path, key, number):
    path = tmp_path / "lmcache.yaml"
    path.write_text(f"{key}: {number}\n")
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(str(path), environ={})


def test_save_decode_cache_without_save_on_checkpoint_names_both_keys(tmp_path):
    path = write(tmp_path, {"save_decode_cache": True, "save_on_checkpoint": False})
    with pytest.raises(ConfigError, match="'save_decode_cache'.*'save_on_checkpoint'"):
        load_config(path, environ={})
    assert load_config(write(tmp_path, {"save_decode_cache": True}), environ={}).save_decode_cache


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 2**20 + 5, GB, 7 * GB + 1])
def test_cpu_tier_must_hold_one_chunk(tmp_path, chunk_bytes):
    smallest = chunk_bytes / GB
    with pytest.raises(ConfigError, match=r"'max_local_cpu_size'.*at least ([0-9.]+) GB") as e:
        LMCacheConfig(max_local_cpu_size=(chunk_bytes - 1) / GB).validated(chunk_bytes=chunk_bytes)
    stated = e.value.args[0].split("at least ")[1].split(" GB")[0]
    assert float(stated) == smallest  # exactly the smallest size that holds a chunk
    assert load_config(write(tmp_path, {"max_local_cpu_size": yaml.safe_load(stated)}), environ={},
                       chunk_bytes=chunk_bytes).cpu_bytes == chunk_bytes
    assert LMCacheConfig(local_cpu=False, max_local_cpu_size=0.0).validated(chunk_bytes=chunk_bytes)
    assert LMCacheConfig(max_local_cpu_size=0.0).validated()  # without chunk_bytes it is not checked


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError, match="max_local_cpu_size"):
        load_config(environ={"LMCACHE_MAX_LOCAL_CPU_SIZE": "lots"})


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), environ={})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path), environ={})


@pytest.fixture(scope="module")
def disk_root(tmp_path_factory):
    return tmp_path_factory.mktemp("disks")


NUMBERS = st.integers() | st.integers(min_value=10**300, max_value=10**400) | st.floats()
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
ENV_TEXTS = st.text() | NUMBERS.map(str) | st.sampled_from(["nan", "-inf", "1e400", " 16 ", "0x10", "1_6", "Yes", "9" * 5000])


def directory_names(root):
    """Paths inside root (no '/' in the name; '..' at worst probes root's parent)."""
    return st.text(st.characters(exclude_characters="/")).map(lambda name: f"{root}/{name}")


def assert_config_or_names_key(key, **kwargs):
    try:
        load_config(page_size=16, **kwargs)
    except ConfigError as e:
        assert repr(key) in str(e)


@pytest.mark.parametrize("key", KEYS)
@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_any_yaml_value_gives_a_config_or_names_the_key(disk_root, key, data):
    values = YAML_VALUES.filter(lambda v: not isinstance(v, str)) | directory_names(disk_root) if key == "local_disk" else YAML_VALUES
    extra = {"max_local_disk_size": 1} if key == "local_disk" else {}
    path = disk_root / "lmcache.yaml"
    path.write_text(yaml.safe_dump({key: data.draw(values), **extra}))
    assert_config_or_names_key(key, path=str(path), environ={})


@pytest.mark.parametrize("key", KEYS)
@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_any_env_value_gives_a_config_or_names_the_key(disk_root, key, data):
    text = data.draw(directory_names(disk_root) if key == "local_disk" else ENV_TEXTS)
    environ = {f"LMCACHE_{key.upper()}": text, "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    assert_config_or_names_key(key, environ=environ)
