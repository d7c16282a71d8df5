"""SSH connections to runner hosts: one per host per process, host keys pinned in `$DSTACK_HOME/known_hosts`.

Authentication tries the ssh-agent, the identity files from the target (`-i`, ~/.ssh/config) and the
default keys. A host's key is pinned the first time (the caller's `accept` sees its fingerprint); a changed
key later is refused.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dstack.errors import HostError, RemoteCommandError
from dstack.ssh.config import SSHTarget, resolve_target

if TYPE_CHECKING:
    import paramiko

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
SFTP_TIMEOUT = 10.0
KEEPALIVE_SECONDS = 5
# sshd's MaxSessions defaults to 10 per connection; the SFTP session holds one of them
MAX_CHANNELS = 8
_BUF = 1 << 16

AcceptKey = Callable[[str], bool]


def import_paramiko() -> None:
    """Import paramiko without the `invoke` package it loads up front for `Match exec` in ssh configs (a
    third of its import time, on the way to a first connection): invoke is imported when such a line is."""
    import sys

    if "paramiko" in sys.modules:
        return
    blocked = "invoke" not in sys.modules
    if blocked:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # `import invoke` raises ImportError
    try:
        import paramiko.config
    finally:
        if blocked and "invoke" in sys.modules and sys.modules["invoke"] is None:
            del sys.modules["invoke"]
    if blocked and getattr(paramiko.config, "invoke", False) is None:
        paramiko.config.invoke = _LazyInvoke()  # type: ignore[attr-defined]


class _LazyInvoke:
    """Stands for the `invoke` module in paramiko.config until it is used."""

    def __getattr__(self, name: str) -> Any:
        import invoke
        import paramiko.config

        paramiko.config.invoke = invoke  # type: ignore[attr-defined]
        return getattr(invoke, name)


def dstack_home() -> Path:
    """`$DSTACK_HOME`, or ~/.dstack."""
    return Path(os.environ.get("DSTACK_HOME") or os.path.expanduser("~/.dstack"))


def known_hosts_path() -> Path:
    """The file where dstack pins host keys (OpenSSH known_hosts format)."""
    return dstack_home() / "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style `SHA256:…` fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def key_line(key: paramiko.PKey) -> str:
    """`<keytype> <base64>`: how a pinned key is stored."""
    return f"{key.get_name()} {key.get_base64()}"


def fingerprint_of_line(line: str) -> str:
    """The fingerprint of a stored `<keytype> <base64>` key."""
    _, data = line.split(None, 1)
    digest = hashlib.sha256(base64.b64decode(data.strip())).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_KNOWN_HOSTS_LOCK = threading.Lock()


def pinned_key(target: SSHTarget) -> str | None:
    """The key pinned for the target's address, as `<keytype> <base64>`, or None."""
    import_paramiko()
    import paramiko

    path = known_hosts_path()
    if not path.exists():
        return None
    keys = paramiko.HostKeys(str(path)).lookup(target.known_hosts_name)
    if not keys:
        return None
    name = next(iter(keys.keys()))
    return key_line(keys[name])


def pin_key(target: SSHTarget, key: paramiko.PKey) -> None:
    """Pin `key` for the target's address (replacing any older pin)."""
    import paramiko

    with _KNOWN_HOSTS_LOCK:
        path = known_hosts_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = paramiko.HostKeys(str(path)) if path.exists() else paramiko.HostKeys()
        _drop(keys, target.known_hosts_name)
        keys.add(target.known_hosts_name, key.get_name(), key)
        _save(keys, path)


def unpin_key(target: SSHTarget) -> bool:
    """Forget the pinned key of the target's address; whether there was one."""
    import paramiko

    with _KNOWN_HOSTS_LOCK:
        path = known_hosts_path()
        if not path.exists():
            return False
        keys = paramiko.HostKeys(str(path))
        found = _drop(keys, target.known_hosts_name)
        if found:
            _save(keys, path)
        return found


def _drop(keys: paramiko.HostKeys, name: str) -> bool:
    found = False
    while keys.lookup(name) is not None:
        del keys[name]
        found = True
    return found


def _save(keys: paramiko.HostKeys, path: Path) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    keys.save(str(tmp))
    os.replace(tmp, path)


class NoSFTPError(HostError):
    """The host's sshd offers no SFTP subsystem (hardened or minimal images): callers use exec instead."""


@dataclass
class Result:
    """What a remote command did."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Connection:
    """One authenticated SSH transport to a host; commands, streams and SFTP share it."""

    def __init__(self, target: SSHTarget, name: str | None = None) -> None:
        self.target = target
        self.name = name or target.alias
        self._client: paramiko.SSHClient | None = None
        self._jump: Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.RLock()  # close() may run while sftp() holds it
        self._home: str | None = None
        self._channels = threading.BoundedSemaphore(MAX_CHANNELS)
        self._open_lock = threading.Lock()
        self._home_lock = threading.Lock()  # one `$HOME` question when threads ask at once
        self.host_key: str | None = None  # `<keytype> <base64>` after connecting
        self.has_sftp: bool | None = None  # None: not tried yet

    # connecting

    def open(self, accept: AcceptKey | None = None) -> None:
        """Connect and authenticate; pin the host key the first time if `accept` says yes."""
        import_paramiko()
        import paramiko

        _quiet_paramiko()
        from dstack.ssh.ordering import install

        install()  # a channel's DATA and EOF never follow its CLOSE
        target = self.target
        sock: Any = None
        if target.proxy_jump:
            self._jump = _open_jump(target.proxy_jump, accept)
            jump_transport = self._jump.transport
            try:
                sock = jump_transport.open_channel(
                    "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT
                )
            except (paramiko.SSHException, OSError) as exc:
                raise HostError(
                    f"cannot reach {self.name} at {target.describe()} through {target.proxy_jump}:"
                    f" {_why(exc)}",
                    hint="check the host name and port as the jump host sees them",
                ) from exc
        else:
            try:
                sock = socket.create_connection((target.hostname, target.port), timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                raise HostError(
                    f"cannot reach {self.name} at {target.describe()}: {_why(exc)}",
                    hint="check that the host is up, the port is right and sshd runs there",
                ) from exc
            # small SSH packets (channel opens, polls) must not wait for delayed ACKs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        path = known_hosts_path()
        if path.exists():
            client.get_host_keys().load(str(path))
        policy = _PinPolicy(self.name, target, accept)
        client.set_missing_host_key_policy(policy)  # type: ignore[arg-type]
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                key_filename=list(target.identity_files) or None,  # type: ignore[arg-type]
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                channel_timeout=CONNECT_TIMEOUT,
                allow_agent=True,
                look_for_keys=True,
                sock=sock,
            )
        except HostError:
            client.close()
            self._close_jump()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            self._close_jump()
            raise HostError(
                f"host key of {self.name} ({target.describe()}) has changed: pinned"
                f" {fingerprint(exc.expected_key)}, now {fingerprint(exc.key)}; refusing to connect",
                hint=f"if the host was reinstalled, re-pin it: `dstack hosts remove {self.name}` then"
                f" `dstack hosts add {_address(target)} --name {self.name}`",
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            self._close_jump()
            raise HostError(
                f"cannot log in to {self.name} as {target.user}: key refused",
                hint="pass -i KEY, load the key into ssh-agent, or check the user and ~/.ssh/config",
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            self._close_jump()
            hint = "check that the host is up, the port is right and sshd runs there"
            if "protocol banner" in str(exc):
                hint = (
                    "check that sshd (not another service) listens on that port and lets this machine in"
                    " (MaxStartups, /etc/hosts.allow, fail2ban)"
                )
            why = _why(exc)
            raise HostError(f"cannot reach {self.name} at {target.describe()}: {why}", hint=hint) from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_SECONDS)
        server_key = transport.get_remote_server_key()
        if policy.accepted is not None:
            pin_key(target, policy.accepted)
        self.host_key = key_line(server_key)
        self._client = client

    def _close_jump(self) -> None:
        self._jump = None  # pooled; closed with the pool

    @property
    def transport(self) -> paramiko.Transport:
        """The live transport; a dropped or dead one (another thread's failure, say) is reconnected once."""
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is not None and transport.is_active():
            return transport
        with self._open_lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is None or not transport.is_active():
                if client is not None:
                    with self._sftp_lock:
                        self._sftp = None
                    client.close()
                    self._client = None
                self.open()  # HostError if the host doesn't answer
                client = self._client
                transport = client.get_transport() if client is not None else None
        if transport is None or not transport.is_active():
            raise HostError(f"{self.name}: connection to {self.target.describe()} was lost")
        return transport

    def is_alive(self) -> bool:
        if self._client is None:
            return False
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        """Close the SFTP session and the transport."""
        with self._sftp_lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except Exception:
                    pass
                self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # commands

    def _session(self, timeout: float) -> paramiko.Channel:
        """A new session channel; at most MAX_CHANNELS at once (release with `_done`)."""
        import paramiko

        if not self._channels.acquire(timeout=timeout):
            raise HostError(f"{self.name}: too many commands at once on one connection")
        try:
            chan = self.transport.open_session(timeout=timeout)
        except BaseException as exc:
            self._channels.release()
            if isinstance(exc, paramiko.ChannelException) and self.is_alive():
                raise HostError(
                    f"{self.name} refused a new SSH session: {exc}",
                    hint="check MaxSessions in the host's sshd_config",
                ) from exc
            if isinstance(exc, (paramiko.SSHException, OSError, EOFError)):
                self._lost(exc)
            raise
        chan.settimeout(timeout)
        return chan

    def _done(self, chan: paramiko.Channel) -> None:
        chan.close()
        self._channels.release()

    def _lost(self, exc: BaseException) -> None:
        drop_connection(self)
        raise HostError(
            f"{self.name} stopped answering ({self.target.describe()}): {_why(exc)}",
            hint="check that the host is up and reachable",
        ) from exc

    def run(
        self,
        command: str,
        *,
        input: bytes | str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = True,
    ) -> Result:
        """Run `command` with bash on the host; RemoteCommandError if it exits non-zero and `check`."""
        data = input.encode() if isinstance(input, str) else input
        chan = self._session(timeout)
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            try:
                chan.exec_command(_bash(command, stdin=bool(data)))
                if data:
                    try:
                        chan.sendall(data)
                    except OSError:  # the channel closed: did the command end before reading it all?
                        if not chan.status_event.wait(5):
                            raise
                    end_input(chan)
                deadline = time.monotonic() + timeout
                while True:
                    if chan.recv_ready():
                        out.append(chan.recv(_BUF))
                        continue
                    if chan.recv_stderr_ready():
                        err.append(chan.recv_stderr(_BUF))
                        continue
                    # EOF and CLOSE come after the last data (the exit status may come before it)
                    if chan.eof_received or chan.closed:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no answer within {timeout:g}s")
                    select.select([chan], [], [], left)
                left = max(deadline - time.monotonic(), 0.1)
                if not chan.status_event.wait(left):
                    raise TimeoutError(f"no exit status within {timeout:g}s")
                code = chan.recv_exit_status()
            except (OSError, EOFError, TimeoutError) as exc:
                self._lost(exc)
                raise AssertionError from exc
        finally:
            self._done(chan)
        result = Result(
            command, code, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
        )
        if check and code != 0:
            raise RemoteCommandError(self.name, command, code, result.stdout + result.stderr)
        return result

    def run_with_writer(
        self, command: str, write: Callable[[IO[bytes]], None], *, timeout: float = 300
    ) -> Result:
        """Run `command` and stream what `write(stdin)` writes into its stdin (e.g. a tar stream)."""
        chan = self._session(timeout)
        try:
            try:
                chan.set_combine_stderr(True)
                chan.exec_command(_bash(command))
                stdin = chan.makefile_stdin("wb")
                try:
                    write(stdin)  # type: ignore[arg-type]
                    stdin.flush()
                except OSError:
                    if not chan.status_event.wait(5):
                        raise
                    # the command ended before reading all its input: report its exit code and output
                end_input(chan)
                stdin.close()
                output = chan.makefile("rb").read()
                code = chan.recv_exit_status()
            except (OSError, EOFError, TimeoutError) as exc:
                self._lost(exc)
                raise AssertionError from exc
        finally:
            self._done(chan)
        text = output.decode(errors="replace")
        if code != 0:
            raise RemoteCommandError(self.name, command, code, text)
        return Result(command, code, text, "")

    def run_with_reader(
        self, command: str, read: Callable[[IO[bytes]], None], *, timeout: float = 300
    ) -> Result:
        """Run `command` and hand its stdout to `read` as a stream (e.g. a tar stream); stderr is kept."""
        chan = self._session(timeout)
        try:
            try:
                chan.exec_command(_bash(command, stdin=False))
                stderr: list[bytes] = []
                drain = threading.Thread(
                    target=lambda: stderr.append(chan.makefile_stderr("rb").read()), daemon=True
                )
                drain.start()
                stdout = chan.makefile("rb")
                read(stdout)  # type: ignore[arg-type]
                stdout.read()  # whatever `read` left
                drain.join(timeout)
                code = chan.recv_exit_status()
            except (OSError, EOFError, TimeoutError) as exc:
                self._lost(exc)
                raise AssertionError from exc
        finally:
            self._done(chan)
        text = b"".join(stderr).decode(errors="replace")
        if code != 0:
            raise RemoteCommandError(self.name, command, code, text)
        return Result(command, code, "", text)

    # files

    @contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        """The connection's SFTP session (opened once), held exclusively while in the `with` block."""
        import paramiko

        with self._sftp_lock:
            if self._sftp is None:
                if self.has_sftp is False:
                    raise NoSFTPError(f"{self.name} has no SFTP subsystem")
                try:
                    self._sftp = self._open_sftp()
                except paramiko.SSHException as exc:
                    if not self.is_alive():
                        self._lost(exc)
                    self.has_sftp = False  # refused, on a live connection: sshd has no `Subsystem sftp`
                    raise NoSFTPError(f"{self.name} has no SFTP subsystem: {_why(exc)}") from exc
                except (OSError, EOFError) as exc:
                    self._lost(exc)
                assert self._sftp is not None
                self.has_sftp = True
                channel = self._sftp.get_channel()
                if channel is not None:  # a dead link must show within the 30 s a lost host is noticed in
                    channel.settimeout(SFTP_TIMEOUT)
            try:
                yield self._sftp
            except (TimeoutError, EOFError) as exc:
                self._sftp = None
                self._lost(exc)
            except paramiko.SSHException as exc:
                self._sftp = None
                self._lost(exc)

    def _open_sftp(self) -> paramiko.SFTPClient:
        import paramiko

        chan = self.transport.open_session(timeout=SFTP_TIMEOUT)
        try:
            chan.invoke_subsystem("sftp")
            return paramiko.SFTPClient(chan)
        except BaseException:
            chan.close()
            raise

    @property
    def home(self) -> str:
        """The login user's home directory on the host."""
        with self._home_lock:
            if self._home is None:
                self._home = self.run('printf %s "$HOME"', timeout=30).stdout.strip()
        return self._home


class _PinPolicy:
    """Ask `accept` about an unknown host key; refuse when there is no one to ask."""

    def __init__(self, name: str, target: SSHTarget, accept: AcceptKey | None) -> None:
        self.name = name
        self.target = target
        self.accept = accept
        self.accepted: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fp = fingerprint(key)
        if self.accept is not None and self.accept(fp):
            self.accepted = key
            return
        raise HostError(
            f"host key of {self.name} ({self.target.describe()}) is not pinned: {key.get_name()} {fp}",
            hint=f"`dstack hosts add {_address(self.target)}` shows it and asks (or pass --yes)",
        )


def _bash(command: str, stdin: bool = True) -> str:
    """The exec line: bash without rc files (the login shell read them already; again costs every command).

    `stdin=False`: its input is /dev/null, so no EOF need be sent on the channel (see `end_input`)."""
    import shlex

    return f"bash --norc --noprofile -c {shlex.quote(command)}" + ("" if stdin else " </dev/null")


def end_input(chan: paramiko.Channel) -> None:
    """Send EOF on a channel unless the other end closed it already (dstack.ssh.ordering keeps it, and our
    data, ahead of our CLOSE: OpenSSH drops the whole connection for either after it)."""
    from dstack.ssh.ordering import end_input as ordered_end_input

    ordered_end_input(chan)


def _address(target: SSHTarget) -> str:
    port = "" if target.port == 22 else f":{target.port}"
    return f"{target.user}@{target.alias}{port}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host name"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return str(exc) if str(exc) and str(exc) != "timed out" else f"no answer within {CONNECT_TIMEOUT:g}s"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Unable to connect" in text:
        return "connection refused"
    if "Error reading SSH protocol banner" in text:
        return "no SSH banner: the connection was closed or went silent before the SSH handshake"
    return text


def _quiet_paramiko() -> None:
    """Keep paramiko's transport thread from printing its own tracebacks (through logging's last resort)
    to the terminal: its failures reach the caller as one HostError."""
    import logging

    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


# the pool: one connection per target per process

_POOL: dict[str, Connection] = {}
_POOL_LOCK = threading.RLock()


def get_connection(
    target: SSHTarget, *, name: str | None = None, accept: AcceptKey | None = None
) -> Connection:
    """The process's connection to `target`, opened (and pinned, see `accept`) if there is none alive."""
    with _POOL_LOCK:
        conn = _POOL.get(target.key)
        if conn is not None and conn.is_alive():
            if name:
                conn.name = name
            return conn
        failed = _WARM_FAILED.pop(target.key, None)
        if failed is not None and time.monotonic() - failed[0] < CONNECT_TIMEOUT:
            raise failed[1]
        if conn is not None:
            conn.close()
        conn = Connection(target, name)
        conn.open(accept)
        _POOL[target.key] = conn
        return conn


_WARM_FAILED: dict[str, tuple[float, HostError]] = {}  # target -> (when, why): a warm-up that got no answer


def warm_up(target: SSHTarget, name: str) -> None:
    """Open the pooled connection to `target` and learn its home folder ahead of its use (in a background
    thread). If the host does not answer, the next `get_connection` to it says so at once, rather than
    waiting a second timeout."""
    with _POOL_LOCK:  # (held until the failure is noted: a caller waiting for the connection sees it)
        try:
            conn = get_connection(target, name=name)
        except HostError as e:
            _WARM_FAILED[target.key] = (time.monotonic(), e)
            return
    try:
        conn.home  # noqa: B018 - cached on the connection
    except HostError:
        pass


def drop_connection(conn: Connection) -> None:
    """Close `conn` and forget it, so the next use reconnects."""
    with _POOL_LOCK:
        if _POOL.get(conn.target.key) is conn:
            del _POOL[conn.target.key]
    conn.close()


def close_all() -> None:
    """Close every pooled connection (at exit, and between tests)."""
    with _POOL_LOCK:
        conns = list(_POOL.values())
        _POOL.clear()
    for conn in conns:
        conn.close()


def _open_jump(spec: str, accept: AcceptKey | None) -> Connection:
    hops = [hop.strip() for hop in spec.split(",") if hop.strip()]
    previous = ",".join(hops[:-1]) or None
    target = resolve_target(hops[-1], proxy_jump=previous)
    return get_connection(target, accept=accept)


atexit.register(close_all)
