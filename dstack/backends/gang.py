"""A multi-node job on SSH hosts: one rank per registered host, started together and watched as one job.

The job's runner is named by its hosts joined with '+', rank 0 first (`box1+box2`; a host's name never
holds a '+'); the hosts and what the job holds on each are in the job's reservation (`ranks`). Every rank
is laid out as any SSH job (code and dependency artifacts from that host's cache); once all are laid out,
all are launched. One rank failing or its host lost ends the others. Rank 0's log is the job's log and its
artifacts are the job's; every rank's log stays in its job folder on its host (`dstack logs RUN --rank N`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dstack.backends.base import Capacity, JobContext, JobState, Runner
from dstack.backends.ssh import SSHRunner
from dstack.errors import DstackError, HostError, UsageError
from dstack.store.reservation import Hold, Reservation

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.store.objects import Manifest, ObjectStore
    from dstack.store.state import State

log = logging.getLogger("dstack.backends.gang")
SEPARATOR = "+"
HOST_LOST_S = float(os.environ.get("DSTACK_HOST_LOST_S", "15"))  # as for a one-host job (watching.py)
T = TypeVar("T")


def gang_name(hosts: list[str]) -> str:
    """The runner name of a job on these hosts (rank 0 first)."""
    return SEPARATOR.join(hosts)


def is_gang(name: str) -> bool:
    return SEPARATOR in name


class RankRunner(SSHRunner):
    """One rank's host: `start_job` lays the job out there; the gang launches every rank at once after."""

    def _launch_command(self, ctx: JobContext, jd: str) -> str:
        return "true"

    def address(self) -> str:
        """The host's address as its peers reach it: the one our SSH session came in on."""
        words = self.conn.run("echo $SSH_CONNECTION", timeout=30).stdout.split()
        return words[2] if len(words) >= 4 else self.target.hostname

    def last_line(self, job_id: str) -> str:
        """The rank's last line of output, cut to 200 characters ("" if it printed nothing)."""
        q = shlex.quote(f"{self.job_dir(job_id)}/log")
        out = self.conn.run(f"tail -c 4096 {q} 2>/dev/null; exit 0", timeout=30).stdout
        lines = [x for x in out.splitlines() if x.strip()]
        return lines[-1].strip()[:200] if lines else ""


class GangRunner(Runner):
    """The ranks of multi-node jobs on the same hosts, in rank order."""

    def __init__(self, state: State, name: str, ranks: list[RankRunner]) -> None:
        self.state = state
        self.name = name
        self.ranks = ranks
        self._silent: dict[str, float] = {}  # host -> since when it has not answered

    @classmethod
    def for_runner(cls, state: State, name: str) -> GangRunner:
        """The gang runner named `box1+box2` (NotFoundError if one of its hosts is not registered)."""
        from dstack.hosts import get

        ranks = [RankRunner(h, RankRunner.for_host(get(state.db, h)).target) for h in name.split(SEPARATOR)]
        return cls(state, name, ranks)

    def _each(self, fn: Callable[[int, RankRunner], T]) -> list[T | Exception]:
        """`fn(rank, runner)` on every rank at once (a thread per host); a failure is returned, not raised."""
        from concurrent.futures import ThreadPoolExecutor

        def call(i: int) -> T | Exception:
            try:
                return fn(i, self.ranks[i])
            except Exception as e:  # noqa: BLE001 - handed back to the caller, which names the rank
                return e

        with ThreadPoolExecutor(max_workers=len(self.ranks)) as pool:
            return list(pool.map(call, range(len(self.ranks))))

    def _first_error(self, results: list[Any], what: str) -> None:
        """Raise the first rank's failure among `results`, naming the rank and its host."""
        for i, res in enumerate(results):
            if isinstance(res, DstackError):
                raise HostError(f"rank {i} on {self.ranks[i].name}: {what}: {res}") from res
            if isinstance(res, Exception):
                raise res

    # starting

    def probe(self) -> Capacity:
        return self.ranks[0].probe()

    def start_job(self, ctx: JobContext) -> None:
        """Lay the job out on every host, then launch every rank (none is launched if one can't be)."""
        from dstack.backends.script import node_rank_env, nodes_env
        from dstack.ssh import process

        held = self.state.job(ctx.job_id).reserved or Reservation()
        per_rank: list[Hold] = list(held.ranks) or [Hold() for _ in self.ranks]
        addresses = self._each(lambda i, r: r.address())
        self._first_error(addresses, "could not read its address")
        ips = [str(a) for a in addresses]
        env = nodes_env(
            nodes=str(len(self.ranks)),
            ips=",".join(ips),
            master=ips[0],
            port=str(self._master_port(ctx.job_id)),
            gpus_per_node=str(ctx.spec.resources.gpu.count),
        )

        def lay_out(i: int, runner: RankRunner) -> None:
            gpus = list(per_rank[i].gpus) if i < len(per_rank) else []
            extra = {**ctx.extra_env, **env, **node_rank_env(str(i))}
            runner.start_job(dataclasses.replace(ctx, gpu_indexes=gpus, extra_env=extra))

        laid = self._each(lay_out)
        if any(isinstance(r, Exception) for r in laid):
            self._each(lambda i, r: r.remove_job(ctx.job_id))
            self._first_error(laid, "could not lay out the job")
        launched = self._each(lambda i, r: process.launch(r.conn, r.job_dir(ctx.job_id)))
        if any(isinstance(r, Exception) or not r for r in launched):
            self._each(lambda i, r: r.stop_job(ctx.job_id))
            self._first_error(launched, "could not launch the job")
            bad = next(i for i, r in enumerate(launched) if not r)
            raise HostError(f"rank {bad} on {self.ranks[bad].name}: the job's process did not start")
        log.info(
            "job %s: ranks started on %s (master %s:%s)", ctx.job_id, self.name, ips[0], env["MASTER_PORT"]
        )

    def _master_port(self, job_id: str) -> int:
        """A port free on rank 0's host from MASTER_PORT on, recorded in the job's reservation."""
        from dstack.backends.script import MASTER_PORT
        from dstack.ports import parse_tcp_table

        in_use = {port for port, _ in parse_tcp_table(self.ranks[0].tcp_table())}
        with self.state.transaction():
            taken = {r.master_port for r in self.state.reservations(self.ranks[0].name)}
            port = next(p for p in range(MASTER_PORT, 65536) if p not in in_use and p not in taken)
            reserved = self.state.job(job_id).reserved or Reservation()
            reserved.master_port = port
            self.state.set_job(job_id, reserved=reserved)
        return port

    # watching

    def poll_job(self, job_id: str) -> JobState:
        """Running while every rank runs or is done; a rank that failed or whose host was lost ends the
        others, and the job's state names that rank."""
        asked = time.monotonic()  # a host that doesn't answer is silent since we asked, not since we gave up
        results = self._each(lambda i, r: r.poll_job(job_id))
        states: list[JobState] = []
        now = time.monotonic()
        for i, res in enumerate(results):
            host = self.ranks[i].name
            if isinstance(res, HostError):
                since = self._silent.setdefault(host, asked)
                log.warning("rank %d: host %s unreachable for %.1fs: %s", i, host, now - since, res)
                if now - since < HOST_LOST_S:
                    states.append(JobState("running"))
                    continue
                self.state.host_lost(host, str(res))
                states.append(JobState("lost", reason=f"host {host} stopped answering: {res}"))
            elif isinstance(res, Exception):
                raise res
            else:
                self._silent.pop(host, None)
                states.append(res)
        bad = next(
            (i for i, s in enumerate(states) if s.status == "lost" or s.exit_code not in (None, 0)), None
        )
        if bad is None:
            if all(s.status == "exited" for s in states):
                return JobState("exited", exit_code=0)
            return JobState("running", reason=next((s.reason for s in states if s.reason), None))
        return self._end_for(job_id, bad, states[bad])

    def _end_for(self, job_id: str, bad: int, state: JobState) -> JobState:
        """Stop every rank but `bad`, say why in rank 0's log, and give the job's state."""
        host = self.ranks[bad].name
        self._each(lambda i, r: None if i == bad else r.stop_job(job_id))
        if state.status == "lost":
            return JobState("lost", reason=f"rank {bad} on {host}: {state.reason}")
        if bad == 0:
            return state
        what = state.reason or f"exited with code {state.exit_code}"
        try:
            last = self.ranks[bad].last_line(job_id)
            note = f"dstack: rank {bad} on {host} {what}{': ' + last if last else ''}; others stopped"
            log_file = shlex.quote(f"{self.ranks[0].job_dir(job_id)}/log")
            self.ranks[0].conn.run(f"echo {shlex.quote(note)} >> {log_file}", timeout=30)
        except DstackError as e:
            log.warning("job %s: could not note rank %d's end in its log: %s", job_id, bad, e)
        return JobState("exited", exit_code=state.exit_code, reason=f"rank {bad} of {len(self.ranks)} failed")

    def read_log(self, job_id: str, offset: int) -> bytes:
        """Rank 0's output (nothing while its host does not answer: `poll_job` decides when it is lost)."""
        try:
            return self.ranks[0].read_log(job_id, offset)
        except HostError:
            return b""

    def read_rank_log(self, job_id: str, rank: int, offset: int) -> bytes:
        if not 0 <= rank < len(self.ranks):
            raise UsageError(f"the job has ranks 0 to {len(self.ranks) - 1}, not {rank}")
        return self.ranks[rank].read_log(job_id, offset)

    def read_metrics(self, job_id: str, offset: int) -> bytes:
        return self.ranks[0].read_metrics(job_id, offset)

    def tcp_table(self) -> str:
        return self.ranks[0].tcp_table()

    # ending

    def stop_job(self, job_id: str) -> None:
        """Stop every rank (all are tried; the first host that failed is raised)."""
        self._first_error(self._each(lambda i, r: r.stop_job(job_id)), "could not stop the job")

    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str = "."
    ) -> tuple[Manifest, list[str]]:
        """Rank 0's artifacts are the job's."""
        return self.ranks[0].collect_artifacts(job_id, spec, store, working_subdir)

    def cleanup_job(self, job_id: str, keep: bool = False) -> None:
        results = self._each(lambda i, r: None if r.name in self._silent else r.cleanup_job(job_id, keep))
        self._first_error(results, "could not clean up the job")

    def remove_job(self, job_id: str) -> None:
        self._first_error(self._each(lambda i, r: r.remove_job(job_id)), "could not remove the job")
