import pytest
import yaml

from lmcache_sgl.config import ConfigError, LMCacheConfig, load_config


def write(tmp_path, values):
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_are_lmcache_units():
    cfg = load_config(environ={})
    assert cfg == LMCacheConfig()
    assert cfg.chunk_size == 256 and cfg.cpu_bytes == 5 * 1024**3 and cfg.disk_path is None


def test_file_then_env_override(tmp_path):
    disk = tmp_path / "disk"
    path = write(tmp_path, {"chunk_size": 64, "local_disk": f"file://{disk}", "max_local_disk_size": 1.5})
    cfg = load_config(environ={"LMCACHE_CONFIG_FILE": path, "LMCACHE_CHUNK_SIZE": "128", "LMCACHE_LOCAL_CPU": "false"})
    assert cfg.chunk_size == 128 and cfg.local_cpu is False and cfg.cpu_bytes == 0
    assert cfg.disk_path == str(disk) and cfg.disk_bytes == int(1.5 * 1024**3) and disk.is_dir()


@pytest.mark.parametrize(
    "values, key",
    [
        ({"chunk_sizee": 256}, "chunk_sizee"),
        ({"chunk_size": "256"}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 100}, "chunk_size"),  # not a multiple of page size 16
        ({"max_local_cpu_size": -1}, "max_local_cpu_size"),
        ({"local_cpu": "yes"}, "local_cpu"),
        ({"write_policy": "sometimes"}, "write_policy"),
        ({"disk_codec": "lz4"}, "disk_codec"),
        ({"local_disk": "/proc/lmcache", "max_local_disk_size": 1}, "local_disk"),
        ({"local_disk": "/tmp/x", "max_local_disk_size": 0}, "max_local_disk_size"),
    ],
)
def test_bad_values_name_the_key(tmp_path, values, key):
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(write(tmp_path, values), page_size=16, environ={})


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
