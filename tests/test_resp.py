"""resp.get_values against a real redis-server: values of every size come back whole
and in order, nil and error replies are told apart, and a failed exchange closes its
connection instead of leaving half a reply for the next caller."""

import socket
import threading

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_sgl.storage import resp
from redis_servers import redis_factory, redis_server  # noqa: F401 (fixtures)


def client(server, **kwargs) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, protocol=2, **kwargs)


# sizes around the read-ahead buffer and the header line, where a reply straddles reads
EDGES = [0, 1, 2, resp._SPILL - 20, resp._SPILL - 9, resp._SPILL, resp._SPILL + 1, 3 * resp._SPILL + 5]


def test_values_come_back_whole_and_in_order(redis_server):
    c = client(redis_server)

    @settings(max_examples=25, deadline=None)
    @given(sizes=st.lists(st.one_of(st.sampled_from(EDGES), st.integers(0, 300_000)), min_size=1, max_size=12))
    def check(sizes):
        rng = np.random.default_rng(len(sizes))
        values = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
        keys = [f"k{i}".encode() for i in range(len(values))]
        c.mset(dict(zip(keys, values, strict=True)))
        got = resp.get_values(c, keys + [b"absent"] + keys[:1])
        assert [g.tobytes() for g in got[: len(keys)]] == values
        assert got[len(keys)] is None and got[-1].tobytes() == values[0]
        assert c.get(keys[0]) == values[0]  # the pooled connection is clean for redis-py

    check()


def test_an_error_reply_is_returned_in_its_place(redis_server):
    c = client(redis_server)
    c.set(b"a", b"1"), c.lpush(b"list", b"x")
    got = resp.get_values(c, [b"a", b"list", b"a"])
    assert isinstance(got[1], redis.ResponseError) and "WRONGTYPE" in str(got[1])
    assert got[0].tobytes() == got[2].tobytes() == b"1"


def test_a_resp3_connection_is_refused(redis_server):
    c = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2, protocol=3)
    with pytest.raises(redis.ConnectionError, match="RESP2"):
        resp.get_values(c, [b"a"])


def test_a_paused_server_times_out_and_the_connection_is_not_reused(redis_server):
    c = redis.Redis(
        host="127.0.0.1", port=redis_server.port, socket_timeout=0.3, protocol=2, retry=Retry(NoBackoff(), 0)
    )
    c.set(b"a", b"x" * 1000)
    redis_server.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            resp.get_values(c, [b"a"])
    finally:
        redis_server.resume()
    assert all(conn._sock is None for conn in c.connection_pool._available_connections)
    assert resp.get_values(c, [b"a"])[0].tobytes() == b"x" * 1000


@pytest.mark.parametrize("cut_after", [0, 5, 70_000])
def test_a_connection_closed_mid_reply_is_an_error(cut_after):
    """A fake server that answers a GET with `cut_after` bytes of a 100 KB value, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    reply = b"$100000\r\n" + b"v" * 100_000 + b"\r\n"

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(reply[:cut_after])

    threading.Thread(target=serve, daemon=True).start()
    c = redis.Redis(host="127.0.0.1", port=listener.getsockname()[1], socket_timeout=2, protocol=2, lib_name=None, lib_version=None)
    with pytest.raises(redis.ConnectionError):
        resp.get_values(c, [b"a"])
    listener.close()


def test_a_garbled_reply_is_a_protocol_error():
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(b"+OK but not a bulk string\r\n")

    threading.Thread(target=serve, daemon=True).start()
    c = redis.Redis(host="127.0.0.1", port=listener.getsockname()[1], socket_timeout=2, protocol=2, lib_name=None, lib_version=None)
    with pytest.raises(redis.ConnectionError, match="protocol error"):
        resp.get_values(c, [b"a"])
    listener.close()
