"""The Slurm runner: a cluster behind its login node, jobs submitted with `sbatch`, watched with `squeue`.

A job's directory is laid out on the shared filesystem exactly as on an SSH host (code and dependency
artifacts from the cluster's object cache, under ~/.dstack/slurm or the cluster's --workdir); then the
batch script `slurm.sh` runs the same `job.sh` on the node Slurm gives it and writes the `exit` file. The
job's log is Slurm's --output file. dstack never reaches the compute nodes itself: only sbatch, squeue,
scancel (and sacct where accounting is on) on the login node.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from typing import TYPE_CHECKING

from dstack.backends.base import Capacity, JobContext, JobState
from dstack.backends.script import node_rank_env, nodes_env, shell_exports
from dstack.backends.slurm_cluster import SlurmCluster, SlurmPartition, read_cluster
from dstack.backends.ssh import SSHRunner
from dstack.errors import HostError

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.ssh.config import SSHTarget
    from dstack.store.hosts import Host

# how often a job's state is asked of Slurm (squeue is the controller's load: never in a tight loop)
POLL_RUNNING_S = float(os.environ.get("DSTACK_SLURM_POLL_S", "1"))
POLL_QUEUED_S = float(os.environ.get("DSTACK_SLURM_QUEUED_POLL_S", "5"))

# Slurm states (squeue %T, sacct State) by what they mean for the job
WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED")
DONE = ("COMPLETED", "FAILED")
# Slurm ended the job: it fails with Slurm's reason; an interruption may be retried
ENDED = {
    "TIMEOUT": "its time limit (max_duration) was reached",
    "CANCELLED": "it was cancelled (scancel)",
    "OUT_OF_MEMORY": "it ran out of memory",
    "DEADLINE": "its deadline passed",
}
INTERRUPTED = {
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "it was preempted",
    "BOOT_FAIL": "its node failed to boot",
}

# The batch script: runs job.sh once per node of the allocation (through srun when there are several; rank 0's
# output is Slurm's --output, the job's log; rank N's goes to rank-N.log) and records its exit code as run.sh
# does. A signal from Slurm (time limit, scancel) is passed on; one rank failing ends the others.
SLURM_SH = """#!/usr/bin/env bash
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1  # sbatch runs in the job's directory
on_stop() {
  kill -TERM "$child" 2>/dev/null
  wait "$child"
  echo 143 > exit.tmp && mv exit.tmp exit
  exit 143
}
trap on_stop TERM INT
nodes=${SLURM_JOB_NUM_NODES:-1}
ips=""
for name in $(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null || hostname); do
  addr=$(scontrol show node -o "$name" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  case "${addr:-$name}" in
  *[!0-9.]*) ip=$(getent ahostsv4 "${addr:-$name}" | awk '{print $1; exit}') ;;  # IPv4 only: no AAAA wait
  *) ip=$addr ;;
  esac
  ips="${ips:+$ips,}${ip:-$name}"
done
@NODES_ENV@
if [ "$nodes" -gt 1 ]; then
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \\
    --kill-on-bad-exit=1 bash ./rank.sh < /dev/null &
else
  bash ./rank.sh < /dev/null &
fi
child=$!
wait "$child"
code=$?
echo $code > exit.tmp && mv exit.tmp exit
exit $code
"""
RANK_SH = """#!/usr/bin/env bash
rank=${SLURM_NODEID:-0}
@RANK_ENV@
if [ "$rank" = 0 ]; then exec bash ./job.sh; fi
exec bash ./job.sh > "rank-$rank.log" 2>&1
"""
SLURM_SH = SLURM_SH.replace(
    "@NODES_ENV@",
    shell_exports(
        nodes_env(
            nodes="$nodes",
            ips="$ips",
            master="${ips%%,*}",
            port="$((20000 + ${SLURM_JOB_ID:-0} % 20000))",
            gpus_per_node="${DSTACK_GPUS_PER_NODE:-0}",
        )
    ),
)
RANK_SH = RANK_SH.replace("@RANK_ENV@", shell_exports(node_rank_env("$rank")))


class SlurmRunner(SSHRunner):
    """Runs jobs on a Slurm cluster through its login node (SSH as for any host, with the same key)."""

    def __init__(self, name: str, target: SSHTarget, cluster: SlurmCluster) -> None:
        super().__init__(name, target, cluster.root)
        self.cluster = cluster
        self._polled: dict[str, tuple[float, JobState]] = {}  # job -> (when, what squeue said)

    @classmethod
    def for_host(cls, host: Host, root: str | None = None) -> SlurmRunner:
        from dstack.hosts import target_of

        return cls(host.name, target_of(host), SlurmCluster.from_json(host.cloud))

    def probe(self) -> Capacity:
        self.cluster = read_cluster(self.conn, self.cluster.options, self.name)
        return self.cluster.capacity()

    # submitting

    def _launch_files(self, ctx: JobContext, jd: str) -> dict[str, tuple[bytes, int]]:
        return {"slurm.sh": (SLURM_SH.encode(), 0o755), "rank.sh": (RANK_SH.encode(), 0o755)}

    def _launch_command(self, ctx: JobContext, jd: str) -> str:
        q = shlex.quote(jd)
        args = " ".join(shlex.quote(a) for a in sbatch_args(self.cluster, ctx, jd))
        return (
            f"cd {q} && rm -f exit slurm_id && {{ [ ! -f log ] || mv -f log log.earlier; }} && "
            f"sbatch --parsable {args} {q}/slurm.sh > slurm_id.tmp && "
            "mv slurm_id.tmp slurm_id && echo slurm_id=$(cat slurm_id)"
        )

    def _launched(self, ctx: JobContext, output: str) -> None:
        if "slurm_id=" not in output:
            raise HostError(f"{self.name}: sbatch said no job id: {output.strip()[-300:]}")

    # watching

    def poll_job(self, job_id: str) -> JobState:
        """The job's state, asking squeue at most every POLL_RUNNING_S (POLL_QUEUED_S while it waits)."""
        last = self._polled.get(job_id)
        if last is not None:
            at, state = last
            every = POLL_QUEUED_S if state.waiting else POLL_RUNNING_S
            if state.status == "running" and time.monotonic() - at < every:
                return state
        state = self._poll(job_id)
        self._polled[job_id] = (time.monotonic(), state)
        return state

    def _poll(self, job_id: str) -> JobState:
        q = shlex.quote(self.job_dir(job_id))
        sacct = (
            'echo "sacct $(sacct -n -X -P -j "$id" -o State 2>/dev/null | head -n 1)"; '
            if self.cluster.sacct
            else ""
        )
        out = self.conn.run(
            f"cd {q} 2>/dev/null || {{ echo nodir; exit 0; }}; id=$(cut -d';' -f1 slurm_id 2>/dev/null); "
            'if [ -n "$id" ]; then echo "id $id"; '
            'echo "squeue $(squeue -h -t all -j "$id" -o \'%T|%r\' 2>/dev/null | head -n 1)"; '
            f'{sacct}fi; [ -f exit ] && echo "exit $(cat exit)"; exit 0',
            timeout=60,
        ).stdout
        return job_state(out)

    def poll_jobs(self, job_ids: list[str]) -> dict[str, JobState]:
        return {j: self.poll_job(j) for j in job_ids}

    def read_rank_log(self, job_id: str, rank: int, offset: int) -> bytes:
        from dstack.ssh import process

        if rank == 0:
            return self.read_log(job_id, offset)
        return process.read_file(self.conn, f"{self.job_dir(job_id)}/rank-{int(rank)}.log", offset)

    def stop_job(self, job_id: str) -> None:
        """`scancel` the job and wait (up to 30 s) until `squeue` no longer lists it.

        (sbatch --parsable prints `ID` or `ID;CLUSTER`: the id is the part before any `;`.)"""
        q = shlex.quote(self.job_dir(job_id))
        self.conn.run(
            f'id=$(cut -d";" -f1 {q}/slurm_id 2>/dev/null) && [ -n "$id" ] || exit 0; '
            'scancel "$id" 2>/dev/null; '
            'for _ in $(seq 150); do [ -z "$(squeue -h -j "$id" -o %T 2>/dev/null)" ] && exit 0; '
            "sleep 0.2; done; exit 0",
            timeout=60,
        )


def job_state(output: str) -> JobState:
    """A JobState from poll_job's lines: `id N`, `squeue STATE|REASON`, `sacct STATE`, `exit CODE`."""
    lines = dict(line.partition(" ")[::2] for line in output.splitlines() if line.strip())
    code_text = lines.get("exit", "").strip()
    code = int(code_text) if code_text.lstrip("-").isdigit() else None
    squeue_state, _, why = lines.get("squeue", "").strip().partition("|")
    state = squeue_state or lines.get("sacct", "").strip()
    state = state.split()[0].rstrip("+") if state else ""
    if "nodir" in lines:
        return JobState("lost", reason="the job's folder on the cluster is gone")
    if state in WAITING:
        why = why if why and why != "None" else state  # (squeue says None for a job it has not looked at yet)
        return JobState("running", reason=f"in Slurm's queue: {why}", waiting=True)
    if state in RUNNING:
        return JobState("running")
    if state in ENDED:
        return JobState("exited", exit_code=code or 1, reason=f"Slurm ended it: {state} ({ENDED[state]})")
    if state in INTERRUPTED:
        return JobState("lost", reason=f"Slurm ended it: {state} ({INTERRUPTED[state]})")
    if code is not None:
        return JobState("exited", exit_code=code)
    if state in DONE:
        return JobState("exited", exit_code=1, reason=f"Slurm says {state}, and the job left no exit code")
    if "id" not in lines:
        return JobState("lost", reason="the job was never submitted to Slurm")
    slurm_id = lines["id"].strip()
    return JobState("lost", reason=f"Slurm no longer knows job {slurm_id} and it left no exit code")


def choose_partition(cluster: SlurmCluster, spec: JobSpec) -> SlurmPartition | None:
    """The first usable partition (the default first) with enough nodes that fit the job."""
    from dstack.scheduler.placement import shortfall

    for partition in cluster.usable():
        one = SlurmCluster(cluster.options, partitions=[partition])
        if shortfall(one.capacity(), spec) is None:
            return partition
    return None


def sbatch_args(cluster: SlurmCluster, ctx: JobContext, jd: str) -> list[str]:
    """sbatch's options for the job: name, output, resources, time limit, partition, account, qos, extras."""
    spec = ctx.spec
    res = spec.resources
    args = [f"--job-name=dstack-{ctx.run_name}-{spec.workflow}"[:100], f"--output={jd}/log", f"--chdir={jd}"]
    # Slurm does not re-run a job itself (dstack's `retry` decides; an earlier attempt's log is moved aside)
    args += ["--open-mode=append", "--no-requeue"]
    args.append(f"--export=ALL,DSTACK_GPUS_PER_NODE={res.gpu.count}")
    nodes = max(1, res.nodes)
    args += [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if res.cpu:
        args.append(f"--cpus-per-task={max(1, math.ceil(res.cpu))}")
    if res.memory_mib:
        args.append(f"--mem={res.memory_mib}M")
    if res.gpu.count:
        name = _gres_name(cluster, res.gpu.name)
        args.append(f"--gres=gpu:{name + ':' if name else ''}{res.gpu.count}")
    if spec.max_duration_s:
        args.append(f"--time={max(1, math.ceil(spec.max_duration_s / 60))}")
    opts = cluster.options
    partition = opts.partition or (p.name if (p := choose_partition(cluster, spec)) else None)
    if partition:
        args.append(f"--partition={partition}")
    if opts.account:
        args.append(f"--account={opts.account}")
    if opts.qos:
        args.append(f"--qos={opts.qos}")
    return args + list(opts.sbatch_args)


def _gres_name(cluster: SlurmCluster, wanted: str | None) -> str:
    """The GRES type naming the GPU the job wants (`v100` matches a node's `tesla_v100`); "" for any."""
    from dstack.scheduler.placement import gpu_matches

    if not wanted:
        return ""
    for partition in cluster.usable():
        for node in partition.nodes:
            for name, _ in node.gpus:
                if name and gpu_matches(name, wanted):
                    return name
    return wanted
