"""Keep a channel's last messages in order: no DATA or EOF of ours may follow our CLOSE.

paramiko builds a channel's DATA and EOF under the channel's lock but sends them after releasing it (so a
re-key can't deadlock), while its transport thread answers the host's CLOSE with ours. A command that ends
before reading all its input can thus see our DATA or EOF arrive after our CLOSE; OpenSSH takes that for a
protocol error ("packet referred to nonexistent channel") and drops the whole connection, every channel of
every job on the host with it. Here each channel gets a send lock held while one of our messages is built
and sent; the transport thread takes it before answering a CLOSE, waiting at most CLOSE_WAIT_S (a re-key
in the middle of a send then costs that long instead of a deadlock).
"""

from __future__ import annotations

import threading
from typing import Any

CLOSE_WAIT_S = 2.0
_CREATE = threading.Lock()


def send_lock(chan: Any) -> threading.Lock:
    """The channel's own lock around sending our messages."""
    lock = chan.__dict__.get("_dstack_send_lock")
    if lock is None:
        with _CREATE:
            lock = chan.__dict__.setdefault("_dstack_send_lock", threading.Lock())
    return lock


def install() -> None:
    """Patch paramiko's Channel once (idempotent)."""
    import paramiko
    from paramiko.common import MSG_CHANNEL_CLOSE

    channel: Any = paramiko.Channel
    if getattr(channel, "_dstack_ordered", False):
        return
    plain_send = channel._send
    plain_close = channel._handle_close

    def _send(self: Any, s: bytes, m: Any) -> int:
        with send_lock(self):
            return plain_send(self, s, m)  # type: ignore[no-any-return]

    def _handle_close(self: Any, m: Any) -> None:
        lock = send_lock(self)
        held = lock.acquire(timeout=CLOSE_WAIT_S)
        try:
            plain_close(self, m)
        finally:
            if held:
                lock.release()

    channel._send = _send
    channel._handle_close = _handle_close
    table: Any = vars(paramiko.Transport)["_channel_handler_table"]  # the handlers, taken at its import
    table[MSG_CHANNEL_CLOSE] = _handle_close
    channel._dstack_ordered = True


def end_input(chan: Any) -> None:
    """Send EOF on the channel unless the other end closed it already (in order: see the module)."""
    with send_lock(chan):
        with chan.lock:
            if chan.closed or chan.eof_sent:
                return
            message = chan._send_eof()
        if message is not None and chan.transport is not None:
            chan.transport._send_user_message(message)
