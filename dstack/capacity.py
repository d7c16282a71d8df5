"""Capacity that comes and goes: sources that can launch a host for a job nothing fits, and reap it later.

The scheduler asks only this protocol; it never names a cloud. A source is registered in SOURCES by the host
kind it makes and the `module:attribute` of its object, so its code loads only where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.store.state import State


class CapacitySource(Protocol):
    """Where hosts can be launched for a job (EC2 first); see `dstack.backends.ec2.EC2Capacity`."""

    kind: str  # the host kind its hosts have (rows in `hosts`), and the prefix of its reasons

    def configured(self, state: State) -> bool:
        """Whether the user set it up (so it may launch hosts)."""

    def launch(self, state: State, spec: JobSpec) -> str | None:
        """Launch (or find launching) a host that fits the job: its name; None if limits forbid it.

        A DstackError when the launch fails (nothing is left running then)."""

    def why_not(self, state: State, spec: JobSpec) -> str:
        """Why `launch` would launch nothing for the job (one line)."""

    def reap_idle(self, state: State) -> None:
        """End hosts idle past their timeout, and forget (interrupting their jobs) those that are gone."""

    def check_host(self, state: State, name: str) -> bool:
        """A host stopped answering: True if it is gone for good (its jobs were interrupted and it is
        forgotten), False while it still exists or is none of this source's."""


SOURCES: dict[str, str] = {"ec2": "dstack.backends.ec2:EC2Capacity"}  # host kind -> module:attribute
_loaded: dict[str, CapacitySource] = {}


def source(kind: str) -> CapacitySource:
    """The registered source making hosts of `kind`."""
    if kind not in _loaded:
        import importlib

        module, _, attr = SOURCES[kind].partition(":")
        _loaded[kind] = getattr(importlib.import_module(module), attr)()
    return _loaded[kind]


def configured_sources(state: State) -> list[CapacitySource]:
    """The sources the user set up, in registration order."""
    return [s for s in (source(k) for k in SOURCES) if s.configured(state)]


def reap_idle(state: State) -> None:
    """Every source with hosts reaps its idle and gone ones (a source without hosts is not even loaded)."""
    for kind in SOURCES:
        if state.has_hosts(kind):
            source(kind).reap_idle(state)


def host_gone(state: State, name: str) -> bool:
    """Whether a configured source finds the unanswering host `name` gone for good (and handled it)."""
    return any(s.check_host(state, name) for s in configured_sources(state))
