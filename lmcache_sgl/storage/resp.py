"""Pipelined GETs whose values are read from a redis-py connection's socket straight into
buffers of their exact size: one copy out of the kernel, where redis-py's own parser
copies each value several times in 64 KiB steps (measured: 0.5 GB/s for MiB values on
loopback, a tenth of what the socket carries).

redis-py still does everything else: the connection pool, connecting, AUTH, TLS (the
socket is then an SSL socket), timeouts (the socket's), and sending the commands. Only
RESP2 replies to GET are parsed here: a bulk string (`$<n>` CRLF bytes CRLF), nil (`$-1`)
or an error (`-...`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np
import redis

_SPILL = 1 << 16  # bytes read ahead for reply headers
# GETs sent ahead of the reply being read. The server builds the replies of every GET it
# has read before it writes the first, so a whole pipeline makes it allocate all of them
# first (measured in a second SGLang server's first load of 32 x 2 MiB: 400-470 ms for the
# whole pipeline, 240 with 4 ahead, 215 with 2, 199 with 1), still without a round trip
# per key.
WINDOW = 1
_MAX_LINE = 1 << 12


def get_values(client: redis.Redis, rkeys: Sequence[bytes]) -> list[np.ndarray | redis.ResponseError | None]:
    """GET of every key, pipelined (WINDOW sent ahead), in order: the value (a uint8 array), None for
    a missing key, or the ResponseError the server answered (e.g. MOVED). `client`
    connects with protocol=2. Raises
    redis.ConnectionError or redis.TimeoutError if the exchange fails; the connection is
    then closed, never returned to the pool half read."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        if str(conn.get_protocol()) != "2":
            raise redis.ConnectionError("resp.get_values reads RESP2 replies only: connect with protocol=2")
        commands = [conn.pack_command("GET", k) for k in rkeys]
        conn.send_packed_command([b"".join(c) for c in commands[:WINDOW]])
        if conn._sock is None:
            raise redis.ConnectionError("the connection has no socket")
        reader = _Reader(conn._sock)
        replies = []
        for i in range(len(rkeys)):
            if i + WINDOW < len(rkeys):  # one more GET in flight for each reply taken
                conn.send_packed_command(commands[i + WINDOW], check_health=False)
            replies.append(reader.reply())
        return replies
    except BaseException as e:
        conn.disconnect()
        if isinstance(e, socket.timeout):
            raise redis.TimeoutError(f"timed out reading GET replies: {e}") from e
        if isinstance(e, OSError):
            raise redis.ConnectionError(f"reading GET replies failed: {e}") from e
        raise
    finally:
        pool.release(conn)


class _Reader:
    """Replies from `sock`: headers through a small read-ahead buffer, values straight
    into their own array."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(_SPILL)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # keep the unread tail, at the front
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
        n = self.sock.recv_into(self.view[self.end :])
        if n == 0:
            raise redis.ConnectionError("the server closed the connection mid-reply")
        self.end += n

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.start, self.end)
            if i >= 0:
                line = bytes(self.buf[self.start : i])
                self.start = i + 2
                return line
            if self.end - self.start > _MAX_LINE:
                raise redis.ConnectionError("protocol error: a reply header without CRLF")
            self._fill()

    def _exactly(self, out: memoryview) -> None:
        """Fill `out`: first from what was read ahead, then from the socket itself."""
        got = min(len(out), self.end - self.start)
        out[:got] = self.view[self.start : self.start + got]
        self.start += got
        while got < len(out):
            n = self.sock.recv_into(out[got:])
            if n == 0:
                raise redis.ConnectionError("the server closed the connection mid-value")
            got += n

    def reply(self) -> np.ndarray | redis.ResponseError | None:
        line = self._line()
        if line[:1] == b"-":
            return redis.ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"$" or not line[1:].lstrip(b"-").isdigit():
            raise redis.ConnectionError(f"protocol error: unexpected reply {line[:40]!r} to GET")
        size = int(line[1:])
        if size < 0:
            return None
        value = np.empty(size, dtype=np.uint8)
        self._exactly(value.data)
        crlf = memoryview(bytearray(2))
        self._exactly(crlf)
        if crlf != b"\r\n":
            raise redis.ConnectionError("protocol error: a value not followed by CRLF")
        return value
