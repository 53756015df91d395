"""A stopping scheduler writes what its cold tiers have queued, within a bounded time.

SGLang stops its scheduler processes in two ways: a graceful ShutdownReq (the scheduler
then calls the cache's release_host_resources) and signals: a SIGTERM to the server's
process group, or Ctrl-C's SIGINT, reaches the scheduler process directly, whose default
action would end it at once and lose every queued write. `flush_on_signals` installs
handlers (in the scheduler's main thread) that first close the engine, at most
`timeout_s` seconds, then hand the signal to what was there before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("lmcache_sgl")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def flush_on_signals(engine, timeout_s: float) -> bool:
    """Install the handlers; False (nothing installed) off the main thread, where Python
    cannot set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        signal.signal(sig, _handler(engine, timeout_s, signal.getsignal(sig)))
    return True


def close_engine(engine, timeout_s: float, why: str) -> None:
    """Close the engine (a second close does nothing), logging what was written."""
    started = time.monotonic()
    done = engine.close(timeout_s)
    log.info(
        "lmcache-sgl: %s: queued writes %s in %.2f s",
        why,
        "finished" if done else f"given up after the {timeout_s:g} s limit",
        time.monotonic() - started,
    )


def _handler(engine, timeout_s: float, previous):
    def on_signal(signum, frame):
        close_engine(engine, timeout_s, f"stopping on {signal.Signals(signum).name}")
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return on_signal
