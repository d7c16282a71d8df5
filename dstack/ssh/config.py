"""Where an SSH target really is: `user@host[:port]` resolved through `~/.ssh/config`."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from pathlib import Path

from dstack.errors import UsageError


@dataclass(frozen=True)
class SSHTarget:
    """A host as we connect to it: the user's alias and what ~/.ssh/config made of it."""

    alias: str  # the host as the user typed it (a ~/.ssh/config Host pattern may match it)
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: tuple[str, ...] = field(default_factory=tuple)
    proxy_jump: str | None = None

    @property
    def key(self) -> str:
        """What identifies one connection in the pool."""
        return f"{self.user}@{self.hostname}:{self.port}" + (f"+{self.proxy_jump}" if self.proxy_jump else "")

    @property
    def known_hosts_name(self) -> str:
        """The name the host key is pinned under (OpenSSH's `[host]:port` form for other ports)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        return f"{self.hostname}:{self.port}"


def default_config_path() -> Path:
    """`~/.ssh/config` of the user running dstack."""
    return Path(os.path.expanduser("~")) / ".ssh" / "config"


def parse_address(address: str) -> tuple[str | None, str, int | None]:
    """Split `user@host[:port]` (also `[v6addr]:port`); raise UsageError when it is malformed."""
    text = address.strip()
    user: str | None = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
        if not user:
            raise UsageError(f"bad host address {address!r}: empty user before '@'")
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"bad host address {address!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"bad host address {address!r}")
            port = _parse_port(rest[1:], address)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, address)
    else:
        host = text
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise UsageError(f"bad host address {address!r}: expected user@host[:port]")
    return user, host, port


def _parse_port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"bad host address {address!r}: port must be a number from 1 to 65535")
    return int(text)


def resolve_target(
    address: str,
    *,
    identity: str | None = None,
    port: int | None = None,
    user: str | None = None,
    proxy_jump: str | None = None,
    config_path: Path | None = None,
) -> SSHTarget:
    """Resolve `user@host[:port]` through ~/.ssh/config (HostName, Port, User, IdentityFile, ProxyJump).

    What the user typed wins over the config; the config wins over the defaults.
    """
    import paramiko

    typed_user, alias, typed_port = parse_address(address)
    path = config_path if config_path is not None else default_config_path()
    options: dict = {}
    if path.is_file():
        try:
            options = dict(paramiko.SSHConfig.from_path(str(path)).lookup(alias))
        except Exception as exc:  # paramiko raises plain exceptions on bad syntax
            raise UsageError(f"{path}: cannot read SSH config: {exc}") from exc
    hostname = str(options.get("hostname") or alias)
    final_port = typed_port or port or int(options.get("port") or 22)
    final_user = typed_user or user or str(options.get("user") or getpass.getuser())
    identities: list[str] = []
    if identity:
        identities.append(os.path.expanduser(identity))
    for item in options.get("identityfile") or []:
        expanded = os.path.expanduser(item)
        if expanded not in identities:
            identities.append(expanded)
    jump = proxy_jump or options.get("proxyjump")
    if jump and str(jump).lower() == "none":
        jump = None
    return SSHTarget(
        alias=alias,
        hostname=hostname,
        port=final_port,
        user=final_user,
        identity_files=tuple(identities),
        proxy_jump=str(jump) if jump else None,
    )
