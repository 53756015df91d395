"""Launch a real SGLang server in a subprocess and talk to it (tests and benchmarks).

    with SGLangServer(model_dir, extra_args=["--max-total-tokens", "4096"]) as srv:
        srv.wait_healthy(180)
        out = srv.generate(list(range(10, 600)), max_new_tokens=8)
        out["meta_info"]["cached_tokens"]

On a machine without a GPU the server runs in CPU mode (lmcache_sgl.sglang.cpu_mode).
Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .sglang import cpu_mode

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server died, failed to become healthy, or answered with an error."""


def free_port() -> int:
    """A TCP port that was free a moment ago (SGLang also binds port+1.. for its own
    sockets, so pick from a range well below the ephemeral ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 60000 and all(_port_free(p) for p in (port, port + 1, port + 2)):
            return port
    raise ServerError("no free port found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch_command(
    model_dir: str | os.PathLike,
    port: int,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
    cpu: bool | None = None,
) -> list[str]:
    """argv of ``python -m sglang.launch_server`` (with CPU-mode flags when on CPU)."""
    cpu = cpu_mode.wanted() if cpu is None else cpu
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if cpu:
        cmd += cpu_mode.server_flags()
    return cmd + list(extra_args)


def launch_env(env_overrides: Mapping[str, str] | None = None, cpu: bool | None = None) -> dict[str, str]:
    """Environment for the server: this repo importable (for the plugin), CPU mode if needed."""
    cpu = cpu_mode.wanted() if cpu is None else cpu
    env = {**os.environ, **(env_overrides or {})}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in path:
        env["PYTHONPATH"] = os.pathsep.join([*path, str(REPO_ROOT)])
    return cpu_mode.server_env(env) if cpu else env


class SGLangServer:
    def __init__(
        self,
        model_dir: str | os.PathLike,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env_overrides: Mapping[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
    ):
        self.model_dir = str(model_dir)
        self.host = host
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env_overrides = dict(env_overrides or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"sglang-{self.port}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SGLangServer:
        if self.proc is not None:
            raise ServerError("server already started")
        cmd = launch_command(self.model_dir, self.port, self.extra_args, self.host)
        env = launch_env(self.env_overrides)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session/process group: stop() can signal SGLang's children too.
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.started_at = time.monotonic()
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = 300.0) -> float:
        """Poll /health_generate until it answers 200; return seconds since start().
        Raises ServerError (with the log tail) if the process exits or time runs out."""
        if self.proc is None:
            raise ServerError("server not started")
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(
                    f"SGLang server exited with code {rc} during start-up; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        return time.monotonic() - (self.started_at or 0.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"SGLang server not healthy after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's whole process group, SIGKILL what is left after
        ``timeout``; waits until no process of the group remains."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            _signal_group(pgid, signal.SIGKILL)
            end = time.monotonic() + 10
            while _group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.1)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> SGLangServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ requests

    def request(self, path: str, payload: Any | None = None, timeout: float = 600.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method="POST" if data else "GET", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path}: HTTP {e.code}: {e.read()[:2000]!r}") from e
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 16,
        return_logprob: bool = True,
        timeout: float = 600.0,
        **sampling: Any,
    ) -> dict:
        """POST /generate with token ids, greedy unless ``sampling`` says otherwise.
        The reply has ``output_ids`` and ``meta_info`` (``cached_tokens``, ``e2e_latency``,
        ``output_token_logprobs`` ...)."""
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling}
        return self.request(
            "/generate",
            {"input_ids": list(map(int, input_ids)), "sampling_params": params, "return_logprob": return_logprob},
            timeout,
        )

    def flush_cache(self) -> None:
        """POST /flush_cache: empties SGLang's radix tree (fails if requests are running)."""
        req = urllib.request.Request(self.url + "/flush_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"/flush_cache: HTTP {e.code}: {e.read()[:500]!r}") from e


def wait_for_files(
    directory: str | os.PathLike, suffix: str = ".lmsg", quiet_s: float = 1.0, timeout: float = 120.0
) -> int:
    """Wait until some files ending in `suffix` are in `directory` and their number has not
    changed for `quiet_s` (a server's background disk writes have settled); their count."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(1 for p in Path(directory).glob(f"*{suffix}")) if Path(directory).is_dir() else 0
        if count != last:
            last, since = count, time.monotonic()
        elif count and time.monotonic() - since >= quiet_s:
            return count
        time.sleep(0.1)
    return max(last, 0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; they are ours only if they are the leader,
    # which Popen.poll() reaps. Children are reaped by init once the leader is gone.
    return _group_has_live_member(pgid)


def _group_has_live_member(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
