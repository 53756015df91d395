"""`lmcache-sgl cache stats|verify|clear` on real disk tier directories: good frames
written by the real DiskTier, corrupt frames, this project's temp files and foreign files."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from lmcache_sgl import cli
from lmcache_sgl.config import GB
from lmcache_sgl.codec import HEADER_BYTES, ChunkLayout, FrameError, encode, frame_bytes, parse_header
from lmcache_sgl.storage import DiskTier, Payload
from lmcache_sgl.storage.disk import LOCK_FILE, directory_in_use
from test_codec import version_2_frame

MHA = ChunkLayout("mha", "bfloat16", (2, 2, 16, 2, 8))
MLA = ChunkLayout("mla", "float16", (1, 2, 16, 24))
GOOD = 6  # frames written by the tier: 3 MHA (zstd), 3 MLA (raw)
T0 = 1_700_000_000  # mtimes of the good frames: T0, T0 + 10, ...


def key(i: int) -> bytes:
    return bytes([i]) * 16


def name(i: int) -> str:
    return key(i).hex() + ".lmsg"


def chunk(layout: ChunkLayout, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape, generator=g).to(getattr(torch, layout.dtype)).contiguous()


def write_good(path, first: int = 0) -> None:
    """GOOD frames written and closed by the real DiskTier, mtimes T0 + 10 * i."""
    for codec, layout, keys in (("zstd", MHA, range(3)), ("raw", MLA, range(3, 6))):
        disk = DiskTier(str(path), 10**8, codec=codec)
        for i in keys:
            data = chunk(layout, i)
            assert disk.put(key(first + i), layout, Payload(data, data.nbytes))
        assert disk.flush(30)
        disk.close()
    for i in range(GOOD):
        os.utime(path / name(first + i), ns=((T0 + 10 * i) * 10**9,) * 2)


def damage(path) -> dict[str, tuple[str, ...]]:
    """Bad frames among the good ones, and files that are not frames; the bad frames' names
    with the error classes verify may report."""
    def edit(i: int, fn) -> None:
        f = path / name(i)
        data = bytearray(f.read_bytes())
        f.write_bytes(bytes(fn(data)))
        os.utime(f, ns=((T0 + 10 * i) * 10**9,) * 2)

    def flip(data):
        data[-40] ^= 0x04  # in the payload: only the checksum can tell
        return data

    edit(1, flip)
    edit(4, lambda data: data[:-7])  # cut short
    (path / name(20)).write_bytes(b"LMSG but not a frame" * 8)  # named like a frame, garbage
    (path / name(21)).write_bytes((path / name(0)).read_bytes())  # a good frame under another key's name
    (path / name(22)).write_bytes(b"")  # empty
    for i in (20, 21, 22):
        os.chmod(path / name(i), 0o600)
        os.utime(path / name(i), ns=((T0 + 100 + i) * 10**9,) * 2)
    # this project's temp file (a write cut short) and files that are not this project's
    (path / (key(30).hex() + ".lmsg.4242.tmp")).write_bytes(b"half a write")
    (path / "notes.txt").write_text("an operator's notes")
    (path / "abc.lmsg").write_bytes(b"not a frame name")
    (path / (name(0) + ".bak")).write_bytes((path / name(0)).read_bytes())
    (path / "sub").mkdir()
    (path / "sub" / name(0)).write_bytes(b"in a subdirectory")
    os.symlink(path / name(0), path / name(40))  # named like a frame, not a regular file
    os.mkfifo(path / name(41))  # would block a reader that opened it without O_NONBLOCK
    cut = ("TruncatedFrame", "ChecksumMismatch")  # which check sees a cut first is the codec's choice
    return {name(1): ("ChecksumMismatch",), name(4): cut, name(20): ("MalformedFrame",),
            name(21): ("KeyMismatch",), name(22): ("TruncatedFrame",)}


FOREIGN = sorted(["notes.txt", "abc.lmsg", name(0) + ".bak", "sub", name(40), name(41)])


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "disk"
    write_good(path)
    return path, damage(path)


def snapshot(root) -> str:
    """A digest of every entry's name, type, mode, size and mtime, and every regular file's
    bytes (links and FIFOs are not followed or opened)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames) + ["."]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}\n".encode())
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["cache", *map(str, argv)])
    return rc, capsys.readouterr().out


def basenames(paths) -> list[str]:
    return sorted(os.path.basename(p) for p in paths)


# ---- the codec and disk helpers the commands use -------------------------------------
def test_parse_header_reads_layout_without_a_key():
    frame = frame_bytes(encode(key(7), MHA, chunk(MHA, 0), "zstd"))
    header = parse_header(frame[:HEADER_BYTES])
    assert (header.key, header.layout, header.codec) == (key(7), MHA, "zstd")
    for bad in (frame[: HEADER_BYTES - 1], b"XXXX" + frame[4:], frame[:9] + b"\x09" + frame[10:]):  # cut, magic, ndim
        with pytest.raises(FrameError):
            parse_header(bad)


def test_directory_in_use_tries_the_lock_and_changes_nothing(tmp_path):
    assert directory_in_use(str(tmp_path)) is None and not (tmp_path / LOCK_FILE).exists()
    disk = DiskTier(str(tmp_path), 10**6)
    before = snapshot(tmp_path)
    assert directory_in_use(str(tmp_path)) == str(os.getpid())
    assert snapshot(tmp_path) == before
    disk.close()
    assert directory_in_use(str(tmp_path)) is None
    DiskTier(str(tmp_path), 10**6).close()  # the lock was not kept by the check


# ---- stats ------------------------------------------------------------------------
def test_stats_counts_headers_and_changes_nothing(cache, capsys):
    path, bad = cache
    before = snapshot(path)
    rc, out = run_cli(capsys, "stats", path, "--budget", "0.001", "--json")
    r = json.loads(out)
    assert rc == 0 and snapshot(path) == before
    files = {name(i) for i in range(GOOD)} | set(bad)
    assert r["chunks"] == len(files) == 9
    assert r["bytes"] == sum((path / n).stat().st_size for n in files)
    assert r["budget_bytes"] == int(0.001 * GB) and r["budget_used"] == pytest.approx(r["bytes"] / int(0.001 * GB))
    readable = [name(i) for i in range(GOOD)]  # headers only: the flipped and the cut frame look good
    assert basenames(b["file"] for b in r["bad_headers"]) == sorted([name(20), name(21), name(22)])
    assert r["raw_bytes"] == 3 * MHA.nbytes + 3 * MLA.nbytes
    assert r["compression_ratio"] == pytest.approx(r["raw_bytes"] / sum((path / n).stat().st_size for n in readable))
    assert r["layouts"] == {"mha bfloat16 2x2x16x2x8": 3, "mla float16 1x2x16x24": 3}
    assert r["dtypes"] == {"bfloat16": 3, "float16": 3} and r["codecs"] == {"zstd": 3, "raw": 3}
    assert os.path.basename(r["oldest"]["file"]) == name(0)
    assert os.path.basename(r["newest"]["file"]) == name(22)
    assert basenames(r["foreign_files"]) == FOREIGN and basenames(r["temp_files"]) == [key(30).hex() + ".lmsg.4242.tmp"]
    assert r["directories"] == [{"path": str(path), "in_use_by_pid": None, "chunks": 9, "bytes": r["bytes"]}]

    rc, text = run_cli(capsys, "stats", path)
    assert rc == 0 and "9 chunks" in text and "mla float16 1x2x16x24 (3)" in text and "budget" not in text
    assert snapshot(path) == before


def test_stats_budget_from_a_config_and_a_live_server(cache, capsys, tmp_path):
    path, _ = cache
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"local_disk: {path}\nmax_local_disk_size: 0.5\n")
    disk = DiskTier(str(path), 10**8)  # a live owner (its start deletes the temp file)
    before = snapshot(path)
    rc, out = run_cli(capsys, "stats", path, "--config", config, "--json")
    r = json.loads(out)
    assert rc == 0 and r["budget_bytes"] == GB // 2 and r["directories"][0]["in_use_by_pid"] == str(os.getpid())
    assert snapshot(path) == before
    disk.close()
    config.write_text("max_local_disk_sise: 1\n")
    assert run_cli(capsys, "stats", path, "--config", config)[0] == 2


def test_stats_of_a_tp_directory_counts_every_rank(tmp_path, capsys):
    write_good(tmp_path / "tp0of2")
    write_good(tmp_path / "tp1of2", first=100)
    rc, out = run_cli(capsys, "stats", tmp_path, "--json")
    r = json.loads(out)
    assert rc == 0 and r["chunks"] == 2 * GOOD and r["foreign_files"] == [] and r["bad_headers"] == []
    assert [d["chunks"] for d in r["directories"]] == [0, GOOD, GOOD]


def test_commands_refuse_a_missing_directory(tmp_path, capsys):
    for command in ("stats", "verify", "clear"):
        assert run_cli(capsys, command, tmp_path / "none")[0] == 2
    assert not (tmp_path / "none").exists()


# ---- verify -----------------------------------------------------------------------
def test_verify_finds_exactly_the_bad_frames_and_changes_nothing(cache, capsys):
    path, bad = cache
    before = snapshot(path)
    rc, out = run_cli(capsys, "verify", path, "--json")
    r = json.loads(out)
    assert rc == 1 and snapshot(path) == before
    found = {os.path.basename(b["file"]): b["error"].split(":")[0] for b in r["bad"]}
    assert found.keys() == bad.keys() and all(found[n] in bad[n] for n in bad)
    assert r["good"] == GOOD - 2 and r["frames"] == GOOD + 3 and r["deleted"] == []
    assert basenames(r["foreign_files"]) == FOREIGN
    rc, text = run_cli(capsys, "verify", path)
    assert rc == 1 and f"bad: {path / name(1)}: ChecksumMismatch" in text and "4 good, 5 bad" in text
    assert snapshot(path) == before


def test_verify_of_good_frames_passes_and_reads_while_a_server_holds_them(tmp_path, capsys):
    write_good(tmp_path)
    disk = DiskTier(str(tmp_path), 10**8)
    rc, out = run_cli(capsys, "verify", tmp_path, "--json")
    r = json.loads(out)
    assert rc == 0 and r["good"] == GOOD and r["bad"] == [] and r["directories"][0]["in_use_by_pid"] == str(os.getpid())
    disk.close()


def test_verify_delete_bad_removes_only_bad_frames_and_refuses_a_live_server(cache, capsys):
    path, bad = cache
    disk = DiskTier(str(path), 10**8)
    before = snapshot(path)
    assert run_cli(capsys, "verify", path, "--delete-bad")[0] == 2
    assert snapshot(path) == before
    disk.close()
    rc, out = run_cli(capsys, "verify", path, "--delete-bad", "--json")
    assert rc == 1 and basenames(json.loads(out)["deleted"]) == sorted(bad)
    left = sorted(os.listdir(path))
    assert left == sorted([LOCK_FILE, *FOREIGN, *(name(i) for i in (0, 2, 3, 5))])
    assert run_cli(capsys, "verify", path)[0] == 0


def test_verify_and_stats_report_frames_of_version_2_as_old_version_frames(tmp_path, capsys):
    write_good(tmp_path)
    for i in (10, 11):
        (tmp_path / name(i)).write_bytes(version_2_frame(key(i), MHA, chunk(MHA, i), "zstd"))
    old = sorted(str(tmp_path / name(i)) for i in (10, 11))
    rc, out = run_cli(capsys, "verify", tmp_path, "--json")
    r = json.loads(out)
    assert rc == 1 and r["good"] == GOOD and sorted(r["old_version_frames"]) == old
    assert {b["file"]: b["error"] for b in r["bad"]} == {
        f: "OldVersionFrame: a version-2 frame, written before an upgrade (this build reads 3)" for f in old
    }
    rc, text = run_cli(capsys, "verify", tmp_path)
    assert rc == 1 and f"{GOOD} good, 2 bad" in text and "old-version frames: 2 (written before an upgrade" in text
    rc, out = run_cli(capsys, "stats", tmp_path, "--json")
    r = json.loads(out)
    assert rc == 0 and r["chunks"] == GOOD + 2 and sorted(r["old_version_frames"]) == old
    assert basenames(b["file"] for b in r["bad_headers"]) == basenames(old)
    assert "old-version frames: 2" in run_cli(capsys, "stats", tmp_path)[1]
    rc, out = run_cli(capsys, "verify", tmp_path, "--delete-bad", "--json")
    assert rc == 1 and sorted(json.loads(out)["deleted"]) == old
    assert run_cli(capsys, "verify", tmp_path)[0] == 0


def test_verify_runs_through_the_console_script(cache):
    path, _ = cache
    script = os.path.join(os.path.dirname(sys.executable), "lmcache-sgl")
    done = subprocess.run([script, "cache", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "4 good, 5 bad" in done.stdout


# ---- clear ------------------------------------------------------------------------
def test_clear_refuses_a_live_server_then_removes_only_this_projects_files(cache, capsys):
    path, _ = cache
    (path / (key(31).hex() + ".lmsg.77.tmp")).write_bytes(b"half a write")
    disk = DiskTier(str(path), 10**8)
    before = snapshot(path)
    rc, _ = run_cli(capsys, "clear", path)
    assert rc == 2 and snapshot(path) == before
    disk.close()
    rc, text = run_cli(capsys, "clear", path)
    assert rc == 0 and "removed 9 chunks" in text
    assert sorted(os.listdir(path)) == sorted([LOCK_FILE, *FOREIGN])
    assert (path / "sub" / name(0)).read_bytes() == b"in a subdirectory"
    again = DiskTier(str(path), 10**8)
    assert len(again) == 0
    again.close()


def test_clear_of_a_tp_directory_needs_every_rank_free(tmp_path, capsys):
    write_good(tmp_path / "tp0of2")
    write_good(tmp_path / "tp1of2", first=100)
    rank1 = DiskTier(str(tmp_path / "tp1of2"), 10**8)
    before = snapshot(tmp_path)
    assert run_cli(capsys, "clear", tmp_path)[0] == 2
    assert snapshot(tmp_path) == before  # not even the free rank was cleared
    rank1.close()
    assert run_cli(capsys, "clear", tmp_path)[0] == 0
    assert not list(tmp_path.glob("*/*.lmsg"))
