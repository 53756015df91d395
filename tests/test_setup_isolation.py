"""scripts/setup.sh: each clone imports its own code, whatever other clones on the machine do.

Two copies of this tree are set up one after the other over the base environment this
checkout's .venv was set up on (no 11 GB install: the base is hard-linked into a private
cache, or linked when that is impossible, so the test never changes the real one).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE_FILE = ROOT / ".venv" / ".lmcache-sgl-base"
PROBE = """
import importlib.metadata as md, json, lmcache_sgl, lmcache_sgl.ops as ops
plugins = [(e.value, str(e.dist._path)) for e in md.entry_points(group="sglang.srt.plugins") if e.name == "lmcache_sgl"]
print(json.dumps({"file": lmcache_sgl.__file__, "ops": ops.__file__, "kernels": ops.HAVE_EXTENSION, "plugins": plugins}))
"""

pytestmark = pytest.mark.skipif(not BASE_FILE.exists(), reason="this checkout's .venv was not set up by scripts/setup.sh")


def copy_tree(dst: Path) -> Path:
    """This tree's tracked and untracked, not ignored, files (what a clone would hold)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def private_cache(tmp: Path) -> tuple[Path, bool]:
    """A cache root holding the base as setup.sh would find it; True if the base there is
    a hard-linked copy (which the test may change), False if a link to the real one."""
    base = Path(BASE_FILE.read_text().strip())
    cache = tmp / "cache"
    cache.mkdir()
    for lint in base.parent.glob("lint-*"):  # the lint tools, only read by setup
        (cache / lint.name).symlink_to(lint)
    try:
        subprocess.run(["cp", "-al", str(base), str(cache / base.name)], check=True, capture_output=True)
        return cache, True
    except subprocess.CalledProcessError:  # another file system
        shutil.rmtree(cache / base.name, ignore_errors=True)
        (cache / base.name).symlink_to(base)
        return cache, False


def setup(clone: Path, cache: Path) -> str:
    env = {**os.environ, "LMCACHE_SGL_ENV_CACHE": str(cache), "PYTHON": sys.executable,
           "CMAKE_ARGS": "-DLMCACHE_SGL_CUDA=OFF"}  # the CPU kernels are enough here, and quick
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def probe(clone: Path) -> dict:
    done = subprocess.run([str(clone / ".venv/bin/python"), "-c", PROBE], cwd="/", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_own(clone: Path) -> None:
    found = probe(clone)
    assert found["file"] == str(clone / "lmcache_sgl" / "__init__.py")
    assert found["ops"] == str(clone / "lmcache_sgl" / "ops.py") and found["kernels"]
    info = next((clone / ".venv").glob("lib/python*/site-packages/lmcache_sgl-*.dist-info"))
    assert found["plugins"] == [["lmcache_sgl.sglang.plugin:register", str(info)]]  # this clone's, and only it
    script = subprocess.run([str(clone / ".venv/bin/lmcache-sgl"), "cache", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert script.returncode == 0 and "stats" in script.stdout


def plant_old_install(base: Path) -> Path:
    """What an older setup left in the base: lmcache-sgl's dist-info and its editable hook."""
    site = next(base.glob("lib/python*/site-packages"))
    info = site / "lmcache_sgl-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache-sgl\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[sglang.srt.plugins]\nlmcache_sgl = lmcache_sgl.sglang.plugin:register\n")
    (site / "_editable_old_lmcache_sgl.pth").write_text("/nonexistent/old-clone\n")
    (info / "RECORD").write_text("".join(f"{p},,\n" for p in (
        "_editable_old_lmcache_sgl.pth", f"{info.name}/METADATA", f"{info.name}/entry_points.txt", f"{info.name}/RECORD",
    )))
    return site


def site_listing(base: Path) -> list[tuple[str, int, int]]:
    """Name, inode and mtime of every entry of the base's site-packages."""
    site = next(base.glob("lib/python*/site-packages"))
    return sorted((p.name, p.lstat().st_ino, p.lstat().st_mtime_ns) for p in site.iterdir() if p.name != "__pycache__")


def test_two_clones_import_their_own_code_and_survive_each_other(tmp_path):
    real_base = Path(BASE_FILE.read_text().strip())
    real_before = site_listing(real_base)
    cache, private = private_cache(tmp_path)
    base = cache / Path(BASE_FILE.read_text().strip()).name
    site = plant_old_install(base) if private else None
    first, second = copy_tree(tmp_path / "first"), copy_tree(tmp_path / "second")
    (first / ".venv").symlink_to(base)  # the layout of older setups: .venv was the base itself

    setup(first, cache)
    assert (first / ".venv").is_dir() and not (first / ".venv").is_symlink()
    if site is not None:
        assert not list(site.glob("lmcache_sgl-*")) and not (site / "_editable_old_lmcache_sgl.pth").exists()
    setup(second, cache)
    assert_own(first)
    assert_own(second)
    assert "building" not in setup(first, cache)  # a second run rebuilds nothing

    shutil.rmtree(first)
    assert_own(second)
    assert site_listing(real_base) == real_before  # a hard-linked copy changes only by unlinking
