"""Port forwards: a listener on this machine's 127.0.0.1 whose connections reach 127.0.0.1:PORT on a host
through the host's SSH connection (`direct-tcpip` channels), like `ssh -L`.

A connection that was dropped is opened again on the next accepted connection (the pool reconnects).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from typing import TYPE_CHECKING

from dstack.errors import HostError

if TYPE_CHECKING:
    import paramiko

    from dstack.ssh.config import SSHTarget

log = logging.getLogger("dstack.ssh.forward")
OPEN_TIMEOUT = 10.0
_BUF = 1 << 16
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def listen_local(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1: at `port` when it is free, else at a free port the kernel picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


class Forward:
    """127.0.0.1:`local_port` here → 127.0.0.1:`remote_port` on the host of `target`, until `close()`."""

    def __init__(self, target: SSHTarget, remote_port: int, name: str | None = None) -> None:
        self.target = target
        self.name = name
        self.remote_port = remote_port
        # a host reached at this machine's loopback shares its ports: taking the job's own one would loop
        same_machine = target.hostname in LOOPBACK_NAMES and not target.proxy_jump
        self._sock = listen_local(0 if same_machine else remote_port)
        self.local_port: int = self._sock.getsockname()[1]
        self.errors: list[str] = []  # why connections could not be opened (latest last)
        self.refused: str | None = None  # the host's sshd will never forward: why
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, paramiko.Channel]] = []
        self._thread = threading.Thread(target=self._accept_loop, name=f"forward-{remote_port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://localhost:{self.local_port}"

    def _channel(self, peer: tuple[str, int]) -> paramiko.Channel:
        """A `direct-tcpip` channel to the host's 127.0.0.1:remote_port (reconnecting a dropped link)."""
        import paramiko

        from dstack.ssh.connection import drop_connection, get_connection

        for attempt in (1, 2):
            conn = get_connection(self.target, name=self.name)
            try:
                return conn.transport.open_channel(
                    "direct-tcpip", ("127.0.0.1", self.remote_port), peer, timeout=OPEN_TIMEOUT
                )
            except paramiko.ChannelException as exc:
                # the host refused: nothing listens there, or (code 1) its sshd forwards nothing
                if exc.code == 1:
                    self.refused = (
                        f"sshd on {conn.name} refuses port forwarding: set `AllowTcpForwarding yes` there"
                    )
                raise HostError(
                    f"{conn.name}: nothing answers at 127.0.0.1:{self.remote_port}: {exc}"
                ) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
                drop_connection(conn)  # a dead link: open a fresh one once
                if attempt == 2:
                    raise HostError(f"{conn.name}: forward to port {self.remote_port} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)
        while not self._closed.is_set():
            try:
                client, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def _serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        try:
            chan = self._channel(peer)
        except HostError as exc:
            self.errors = [*self.errors[-9:], str(exc)]  # the last ten
            log.info("%s", exc)
            client.close()
            return
        with self._lock:
            self._pairs.append((client, chan))
        try:
            _pump(client, chan, self._closed)
        finally:
            with self._lock:
                self._pairs = [p for p in self._pairs if p[0] is not client]
            chan.close()
            client.close()

    def close(self) -> None:
        """Stop listening and end the connections open through the forward."""
        self._closed.set()
        self._sock.close()
        self._thread.join(2)
        with self._lock:
            pairs = list(self._pairs)
        for client, chan in pairs:
            chan.close()
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _pump(client: socket.socket, chan: paramiko.Channel, closed: threading.Event) -> None:
    """Copy bytes both ways until both sides have finished sending (or the forward closes)."""
    from dstack.ssh.connection import end_input

    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ, chan)
    sel.register(chan, selectors.EVENT_READ, client)
    open_ends = 2
    try:
        while open_ends and not closed.is_set():
            for key, _ in sel.select(0.5):
                src, dst = key.fileobj, key.data
                try:
                    data = src.recv(_BUF)  # type: ignore[union-attr]
                except OSError:
                    return
                if data:
                    try:
                        dst.sendall(data)
                    except OSError:
                        return
                    continue
                sel.unregister(src)  # this side is done sending: pass the end on
                open_ends -= 1
                try:
                    if dst is chan:
                        end_input(chan)
                    else:
                        client.shutdown(socket.SHUT_WR)
                except OSError:
                    return
    finally:
        sel.close()
