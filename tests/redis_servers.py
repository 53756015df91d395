"""Real redis-server processes for tests: one server, or a Redis Cluster of masters, on
free loopback ports, each in its own temporary directory, always stopped by a finalizer.

Use the fixtures `redis_server` (one fresh server per test) and `redis_factory` (call it
for as many servers, with extra redis-server arguments, as a test needs); a `RedisServer`
can be killed, paused (SIGSTOP), resumed and restarted on the same port. Both fixtures
run each test once with redis-server and once with valkey-server (the fork, same
arguments and protocol); the valkey run is skipped where valkey-server is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
SERVERS = {"redis-server": REDIS_SERVER, "valkey-server": shutil.which("valkey-server")}


def free_port(bus: bool = False) -> int:
    """A free loopback port; `bus`: one whose cluster bus port (+10000) exists and is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


class RedisServer:
    """One redis-server (or `binary`, e.g. valkey-server) on 127.0.0.1 (no persistence,
    no protected mode)."""

    def __init__(self, args: tuple[str, ...] = (), *, tls: bool = False, binary: str | None = REDIS_SERVER) -> None:
        self.args, self.tls, self.binary = tuple(args), tls, binary
        self.dir = tempfile.mkdtemp(prefix="lmcsgl-redis-")
        self.port = free_port(bus="--cluster-enabled" in args)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, wait: bool = True) -> None:
        port_args = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [self.binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = open(os.path.join(self.dir, "redis.log")).read()[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not listen within {timeout} s")

    def client(self, **kwargs) -> redis.Redis:
        """A plain redis-py client (for tests without AUTH or TLS)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def kill(self) -> None:
        """SIGKILL: the server is gone, its data with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(masters: int, factory, tls: tuple[str, str, str] | None = None) -> list[RedisServer]:
    """`masters` redis-servers joined into a cluster (no replicas; a master's loss
    leaves the other slots served: cluster-require-full-coverage no). `tls`: the (CA,
    certificate, key) PEM files: clients, the cluster bus and redis-cli then use TLS
    only (see tls_client_kwargs)."""
    extra = () if tls is None else ("--tls-ca-cert-file", tls[0], "--tls-cert-file", tls[1], "--tls-key-file", tls[2],
                                    "--tls-cluster", "yes")
    nodes = [factory("--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                     "--cluster-require-full-coverage", "no", *extra, tls=tls is not None) for _ in range(masters)]
    cli_tls = [] if tls is None else ["--tls", "--cacert", tls[0], "--cert", tls[1], "--key", tls[2]]
    subprocess.run(
        [REDIS_CLI, *cli_tls, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas",
         "0", "--cluster-yes"], check=True, capture_output=True, timeout=30,
    )
    kwargs = tls_client_kwargs(tls)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(b"cluster_state:ok" in n.client(**kwargs).execute_command("CLUSTER", "INFO") for n in nodes):
            return nodes
        time.sleep(0.1)
    raise TimeoutError("the cluster did not reach cluster_state:ok")


def tls_client_kwargs(tls: tuple[str, str, str] | None) -> dict:
    """RedisServer.client() arguments for a server started with the (CA, cert, key) `tls`."""
    return {} if tls is None else {"ssl": True, "ssl_ca_certs": tls[0], "ssl_certfile": tls[1], "ssl_keyfile": tls[2]}


@pytest.fixture(params=list(SERVERS))
def redis_factory(request):
    binary = SERVERS[request.param]
    if binary is None and request.param == "valkey-server":
        pytest.skip("valkey-server is not installed (.ci/run installs it from bookworm-backports)")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    servers: list[RedisServer] = []

    def make(*args: str, tls: bool = False) -> RedisServer:
        server = RedisServer(args, tls=tls, binary=binary)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    return redis_factory()
