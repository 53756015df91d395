"""``lmcache-sgl`` command line.

    lmcache-sgl make-model DIR --preset tiny|small|mla-tiny [--seed N] [--force]
    lmcache-sgl serve [--model-dir DIR] [--preset small] [--port 30000] [-- SGLANG ARGS...]
    lmcache-sgl cache stats|verify|clear DIR ...   (see lmcache_sgl/inspect_cache.py)

``serve`` builds the model if missing, then replaces itself with the real SGLang server
(``python -m sglang.launch_server``), in CPU mode on a machine without a GPU; every
argument after ``--`` goes to SGLang unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from . import inspect_cache, models


def default_model_dir(preset: str, seed: int) -> Path:
    from .sglang.cpu_mode import cache_dir

    return cache_dir() / "models" / f"{preset}-seed{seed}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcache-sgl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a random-weight model SGLang can serve")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--preset", choices=sorted(models.PRESETS), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--force", action="store_true", help="rebuild even if DIR is complete")

    sv = sub.add_parser("serve", help="run the SGLang server (args after -- go to SGLang)")
    sv.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model directory; built from --preset/--seed if missing "
        "(default: ~/.cache/lmcache-sgl/models/PRESET-seedSEED)",
    )
    sv.add_argument("--preset", choices=sorted(models.PRESETS), default="small")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=30000)
    sv.add_argument("--dry-run", action="store_true", help="print the command, do not run it")

    inspect_cache.add_parser(sub)
    return p


def _plugin_registered() -> bool:
    return any(ep.value.startswith("lmcache_sgl.") for ep in entry_points(group="sglang.srt.plugins"))


def serve(args: argparse.Namespace, sglang_args: list[str]) -> int:
    from .server import launch_command, launch_env
    from .sglang import cpu_mode

    model_dir = args.model_dir or default_model_dir(args.preset, args.seed)
    if not (model_dir / "config.json").exists():
        print(f"lmcache-sgl: building {args.preset} model (seed {args.seed}) in {model_dir}", file=sys.stderr)
        models.make_model(model_dir, args.preset, args.seed)
    cpu = cpu_mode.wanted()
    cmd = launch_command(model_dir, args.port, sglang_args, host=args.host, cpu=cpu)
    env = launch_env(cpu=cpu)
    if cpu:
        print("lmcache-sgl: no GPU here: SGLang runs in CPU development mode", file=sys.stderr)
        if not _plugin_registered():
            print(
                "lmcache-sgl: warning: the lmcache_sgl SGLang plugin is not installed "
                "(pip install -e .), so CPU mode's attention hooks are not active",
                file=sys.stderr,
            )
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.execve(cmd[0], cmd, env)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    args = _parser().parse_args(argv)
    if args.command in ("make-model", "cache") and passthrough:
        _parser().error(f"{args.command} takes no arguments after --")
    if args.command == "cache":
        return inspect_cache.run(args)
    if args.command == "make-model":
        path = models.make_model(args.dir, args.preset, args.seed, force=args.force)
        print(path)
        return 0
    return serve(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
