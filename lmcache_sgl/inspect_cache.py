"""``lmcache-sgl cache``: look inside a disk tier's directory without a server.

    lmcache-sgl cache stats DIR [--budget GB | --config FILE] [--json]
    lmcache-sgl cache verify DIR [--delete-bad] [--json]
    lmcache-sgl cache clear DIR

DIR is a disk tier's directory (``local_disk``), or the parent of a TP server's per-rank
directories ``tp<rank>of<size>/``; each of them is read. Frames are regular files named
``<32 hex>.lmsg``, this project's temp files ``<frame>.<digits>.tmp``, and
``.lmcache-sgl.lock`` is the tier's lock; anything else is foreign: never read, changed
or deleted. ``stats`` and ``verify`` only read (they take no lock, create nothing and
change no mtime), even while a server runs. ``clear`` and ``verify --delete-bad`` take
each directory's lock as a server does, so they refuse a directory a live server holds.
Frames of an earlier format version (written before an upgrade; servers drop them when
read) are bad frames, reported as old-version frames.
Exit status: 0, 1 if ``verify`` found a bad frame, 2 if DIR cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import torch
import yaml

from .codec import (
    HEADER_BYTES,
    ChunkLayout,
    FrameError,
    FrameHeader,
    KeyMismatch,
    OldVersionFrame,
    parse_header,
    read_into,
)
from .config import GB, ConfigError, LMCacheConfig, config_from_mapping
from .storage.disk import (
    FRAME_NAME,
    LOCK_FILE,
    SUFFIX,
    TEMP_NAME,
    DiskDirectoryError,
    claim_directory,
    directory_in_use,
    open_frame,
)

RANK_DIR = re.compile(r"tp\d+of\d+")  # the per-rank directories of storage/factory.py
EXIT_BAD = 1
EXIT_ERROR = 2


class CacheDirError(Exception):
    """DIR cannot be inspected or changed; the message says why."""


@dataclasses.dataclass(frozen=True)
class FrameFile:
    path: str
    size: int
    mtime_ns: int


@dataclasses.dataclass
class TierDir:
    """One disk tier directory's entries, by kind."""

    path: str
    owner: str | None  # pid of the live server holding its lock, None if none does
    frames: list[FrameFile] = dataclasses.field(default_factory=list)
    temps: list[str] = dataclasses.field(default_factory=list)
    foreign: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What reading one frame found: its header if good, else why it is bad (`old`: it is
    of an earlier format version); neither if the file vanished meanwhile (a live server
    evicted it)."""

    frame: FrameFile
    header: FrameHeader | None = None
    error: str | None = None
    old: bool = False


# ---- reading -----------------------------------------------------------------------
def tier_dirs(root: str) -> list[str]:
    """`root` and its per-rank directories; CacheDirError if `root` is not a directory."""
    if not os.path.isdir(root):
        raise CacheDirError(f"{root!r} is not a directory")
    ranks = [e.path for e in os.scandir(root) if RANK_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    return [root, *sorted(ranks)]


def list_dir(path: str, *, root: bool) -> TierDir:
    """The entries of the tier directory `path` (the per-rank directories of a `root`
    are not foreign: they are listed on their own)."""
    tier = TierDir(path, directory_in_use(path))
    for entry in os.scandir(path):
        name = entry.name
        try:
            if name == LOCK_FILE:
                continue
            if FRAME_NAME.fullmatch(name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                tier.frames.append(FrameFile(entry.path, st.st_size, st.st_mtime_ns))
            elif TEMP_NAME.fullmatch(name) and entry.is_file(follow_symlinks=False):
                tier.temps.append(entry.path)
            elif not (root and RANK_DIR.fullmatch(name) and entry.is_dir(follow_symlinks=False)):
                tier.foreign.append(entry.path)
        except FileNotFoundError:
            continue  # removed by a live server meanwhile
    tier.frames.sort(key=lambda f: f.path)
    tier.temps.sort()
    tier.foreign.sort()
    return tier


def scan(root: str) -> list[TierDir]:
    return [list_dir(d, root=d == root) for d in tier_dirs(root)]


def _checked_header(fd: int, path: str) -> FrameHeader:
    header = parse_header(os.pread(fd, HEADER_BYTES, 0))
    if header.key.hex() + SUFFIX != os.path.basename(path):
        raise KeyMismatch(f"frame holds key {header.key.hex()}, not the one its file name says")
    return header


def read_header(frame: FrameFile) -> FrameHeader:
    """The header of `frame`, which must hold the key its name says; FrameError if it is
    bad, OSError if the file cannot be read."""
    fd, _ = open_frame(frame.path)
    try:
        return _checked_header(fd, frame.path)
    finally:
        os.close(fd)


_local = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """A per-thread buffer of at least `nbytes`, reused across frames."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def verify_frame(frame: FrameFile) -> FrameHeader:
    """Read and check all of `frame`: header and key, size, checksum, every block decoded
    (as a server's read would); its header. FrameError if it is bad, OSError if unreadable."""
    fd, size = open_frame(frame.path)
    try:
        header = _checked_header(fd, frame.path)
        read_into(fd, size, header.key, header.layout, _scratch(header.layout.nbytes), parallel=False)
        return header
    finally:
        os.close(fd)


def _outcome(check: Callable[[FrameFile], FrameHeader], frame: FrameFile) -> Outcome:
    try:
        return Outcome(frame, header=check(frame))
    except FileNotFoundError:
        return Outcome(frame)
    except FrameError as e:
        return Outcome(frame, error=f"{type(e).__name__}: {e}", old=isinstance(e, OldVersionFrame))
    except OSError as e:
        return Outcome(frame, error=f"unreadable: {e.strerror or e}")


def check_all(check: Callable[[FrameFile], FrameHeader], frames: Sequence[FrameFile]) -> list[Outcome]:
    """`check` of every frame, one frame per core at a time, in the order given."""
    workers = max(1, min(len(frames), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="lmcsgl-inspect") as pool:
        return list(pool.map(lambda f: _outcome(check, f), frames))


# ---- the commands ------------------------------------------------------------------
def layout_name(layout: ChunkLayout) -> str:
    return f"{layout.kind} {layout.dtype} {'x'.join(map(str, layout.shape))}"


def _when(frame: FrameFile) -> dict[str, str]:
    stamp = datetime.fromtimestamp(frame.mtime_ns / 1e9).astimezone().isoformat(timespec="seconds")
    return {"file": frame.path, "written": stamp}


def _common(tiers: list[TierDir], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "old_version_frames": [o.frame.path for o in outcomes if o.old],
        "directories": [
            {"path": t.path, "in_use_by_pid": t.owner, "chunks": len(t.frames), "bytes": sum(f.size for f in t.frames)}
            for t in tiers
        ],
        "temp_files": [p for t in tiers for p in t.temps],
        "foreign_files": [p for t in tiers for p in t.foreign],
    }


def stats(root: str, budget_bytes: int | None = None) -> dict[str, Any]:
    """What `root` holds, from every frame's header (no payload is read or checked)."""
    tiers = scan(root)
    outcomes = [o for o in check_all(read_header, [f for t in tiers for f in t.frames]) if o.header or o.error]
    good = [(o.frame, o.header) for o in outcomes if o.header is not None]
    stored = sum(f.size for f, _ in good)
    raw = sum(h.layout.nbytes for _, h in good)
    by_time = sorted((o.frame for o in outcomes), key=lambda f: f.mtime_ns)
    total = sum(o.frame.size for o in outcomes)
    return {
        "directory": root,
        "chunks": len(outcomes),
        "bytes": total,
        "raw_bytes": raw,
        "compression_ratio": raw / stored if stored else None,
        "layouts": dict(Counter(layout_name(h.layout) for _, h in good).most_common()),
        "dtypes": dict(Counter(h.layout.dtype for _, h in good).most_common()),
        "codecs": dict(Counter(h.codec for _, h in good).most_common()),
        "oldest": _when(by_time[0]) if by_time else None,
        "newest": _when(by_time[-1]) if by_time else None,
        "budget_bytes": budget_bytes,
        "budget_used": total / budget_bytes if budget_bytes else None,
        "bad_headers": [{"file": o.frame.path, "error": o.error} for o in outcomes if o.error],
        **_common(tiers, outcomes),
    }


@contextmanager
def claimed(paths: Sequence[str]) -> Iterator[None]:
    """Hold the lock of every directory in `paths`, as a server would; CacheDirError (and
    no lock kept) if one cannot be claimed, e.g. a live server holds it; a directory that
    a live server holds is seen before any is claimed, so nothing is changed then."""
    for path in paths:
        if (owner := directory_in_use(path)) is not None:
            raise CacheDirError(f"{path!r} is in use by a live server (pid {owner}); stop it first")
    fds: list[int] = []
    try:
        for path in paths:
            try:
                fds.append(claim_directory(path))
            except DiskDirectoryError as e:
                raise CacheDirError(str(e)) from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def verify(root: str, *, delete_bad: bool = False) -> dict[str, Any]:
    """Every frame of `root` read and checked on every core; with `delete_bad`, under the
    directories' locks, the bad frames are deleted."""
    dirs = tier_dirs(root)
    with claimed(dirs if delete_bad else []):
        tiers = [list_dir(d, root=d == root) for d in dirs]
        start = time.perf_counter()
        outcomes = check_all(verify_frame, [f for t in tiers for f in t.frames])
        seconds = time.perf_counter() - start
        bad = [o for o in outcomes if o.error]
        deleted = [o.frame.path for o in bad if delete_bad and _remove(o.frame.path)]
    return {
        "directory": root,
        "frames": sum(1 for o in outcomes if o.header or o.error),
        "good": sum(1 for o in outcomes if o.header),
        "bad": [{"file": o.frame.path, "error": o.error} for o in bad],
        "vanished": sum(1 for o in outcomes if not (o.header or o.error)),
        "bytes": sum(o.frame.size for o in outcomes),
        "seconds": seconds,
        "deleted": deleted,
        **_common(tiers, outcomes),
    }


def clear(root: str) -> dict[str, Any]:
    """Under the directories' locks, delete every frame and temp file of `root`; the
    directories, their lock files and foreign files stay."""
    dirs = tier_dirs(root)
    with claimed(dirs):
        tiers = [list_dir(d, root=d == root) for d in dirs]
        removed = [f for t in tiers for f in t.frames if _remove(f.path)]
        temps = [p for t in tiers for p in t.temps if _remove(p)]
    return {
        "directory": root,
        "removed_chunks": len(removed),
        "removed_bytes": sum(f.size for f in removed),
        "removed_temp_files": len(temps),
        "foreign_files": [p for t in tiers for p in t.foreign],
    }


# ---- command line ------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `cache stats|verify|clear` on the CLI's subcommands."""
    cache = sub.add_parser("cache", help="inspect, verify or clear a disk tier directory without a server")
    commands = cache.add_subparsers(dest="cache_command", required=True)
    st = commands.add_parser("stats", help="chunks, bytes, compression, layouts, ages, budget use")
    st.add_argument("dir")
    budget = st.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, metavar="GB", help="the disk budget (max_local_disk_size)")
    budget.add_argument("--config", metavar="FILE", help="an lmcache config: its max_local_disk_size is the budget")
    st.add_argument("--json", action="store_true")
    ver = commands.add_parser("verify", help="check every frame (header, size, checksum) on every core")
    ver.add_argument("dir")
    ver.add_argument("--delete-bad", action="store_true", help="delete bad frames (refused while a server runs)")
    ver.add_argument("--json", action="store_true")
    cl = commands.add_parser("clear", help="delete this project's files (refused while a server runs)")
    cl.add_argument("dir")


def _budget(args: argparse.Namespace) -> int | None:
    if args.budget is not None:
        return int(args.budget * GB)
    if args.config is None:
        return None
    try:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError("it must hold a mapping of keys to values")
        config = dataclasses.replace(LMCacheConfig(), **config_from_mapping(values))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise CacheDirError(f"cannot read the lmcache config {args.config!r}: {e}") from e
    return config.disk_bytes or None


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")  # binary, as the config's GB
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def _print_common(r: dict[str, Any]) -> None:
    if r["old_version_frames"]:
        print(
            f"  old-version frames: {len(r['old_version_frames'])} (written before an upgrade: a server drops "
            "each when it reads it; `lmcache-sgl cache verify --delete-bad` removes them)"
        )
    for d in r["directories"]:
        held = f"held by a live server (pid {d['in_use_by_pid']})" if d["in_use_by_pid"] else "no live server"
        print(f"  {d['path']}: {d['chunks']} chunks, {_size(d['bytes'])}, {held}")
    if r["temp_files"]:
        print(f"  temp files: {len(r['temp_files'])} (writes in progress, or cut short by a crash)")
    if r["foreign_files"]:
        print(f"  not this project's (left alone): {', '.join(r['foreign_files'])}")


def _print_stats(r: dict[str, Any]) -> None:
    ratio = f"{r['compression_ratio']:.2f}x" if r["compression_ratio"] else "n/a"
    print(
        f"{r['directory']}: {r['chunks']} chunks, {_size(r['bytes'])} on disk, "
        f"{_size(r['raw_bytes'])} of KV, compression ratio {ratio}"
    )
    if r["budget_bytes"]:
        print(f"  budget: {_size(r['bytes'])} of {_size(r['budget_bytes'])} ({100 * r['budget_used']:.1f}%)")
    for title in ("layouts", "dtypes", "codecs"):
        if r[title]:
            print(f"  {title}: " + ", ".join(f"{k} ({n})" for k, n in r[title].items()))
    for title in ("oldest", "newest"):
        if r[title]:
            print(f"  {title}: {r[title]['written']} {os.path.basename(r[title]['file'])}")
    if r["bad_headers"]:
        print(f"  unreadable headers: {len(r['bad_headers'])} (run `lmcache-sgl cache verify`)")
    _print_common(r)


def _print_verify(r: dict[str, Any]) -> None:
    print(
        f"{r['directory']}: {r['frames']} frames ({_size(r['bytes'])}) checked in {r['seconds']:.2f} s: "
        f"{r['good']} good, {len(r['bad'])} bad" + (f", {r['vanished']} vanished meanwhile" if r["vanished"] else "")
    )
    for bad in r["bad"]:
        print(f"  bad: {bad['file']}: {bad['error']}")
    if r["deleted"]:
        print(f"  deleted {len(r['deleted'])} bad frames")
    _print_common(r)


def run(args: argparse.Namespace) -> int:
    """Run the parsed `cache` command; its exit status."""
    try:
        if args.cache_command == "stats":
            result = stats(args.dir, _budget(args))
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                _print_stats(result)
            return 0
        if args.cache_command == "verify":
            result = verify(args.dir, delete_bad=args.delete_bad)
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                _print_verify(result)
            return EXIT_BAD if result["bad"] else 0
        result = clear(args.dir)
        print(
            f"{result['directory']}: removed {result['removed_chunks']} chunks "
            f"({_size(result['removed_bytes'])}) and {result['removed_temp_files']} temp files"
            + (f"; left {len(result['foreign_files'])} files not this project's" if result["foreign_files"] else "")
        )
        return 0
    except (CacheDirError, OSError) as e:
        print(f"lmcache-sgl cache {args.cache_command}: {e}", file=sys.stderr)
        return EXIT_ERROR
