"""The SSH runner: jobs run on a registered host, detached, in `~/.dstack/jobs/<job_id>/` there.

Code and dependency artifacts reach the host through its object cache (`~/.dstack/objects/`, see
dstack.ssh.transfer); the job's `env.sh`/`job.sh`/`run.sh` are the same files the local runner writes.
"""

from __future__ import annotations

import io
import os
import posixpath
import shlex
import tarfile
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dstack.backends.base import Capacity, JobContext, JobState, Runner
from dstack.backends.script import RUN_SH, job_env, render_env, render_job

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.ssh.config import SSHTarget
    from dstack.ssh.connection import Connection
    from dstack.ssh.transfer import ShipResult
    from dstack.store.hosts import Host
    from dstack.store.objects import Manifest, ManifestEntry, ObjectStore
    from dstack.store.state import State


class SSHRunner(Runner):
    """Runs jobs on one SSH host over the process's pooled connection to it."""

    def __init__(self, name: str, target: SSHTarget, root: str | None = None) -> None:
        self.name = name
        self.target = target
        self._root = root  # absolute dstack folder on the host; default: ~/.dstack there
        self.last_ship: ShipResult | None = None  # what the last start_job sent (for benchmarks and tests)

    @classmethod
    def for_host(cls, host: Host, root: str | None = None) -> SSHRunner:
        """The runner of a registered host."""
        from dstack.hosts import target_of

        return cls(host.name, target_of(host), root)

    @classmethod
    def for_runner(cls, state: State, name: str) -> SSHRunner:
        """The runner of the registered host called `name` (NotFoundError if there is none)."""
        from dstack.hosts import get

        return cls.for_host(get(state.db, name))

    # paths on the host

    @property
    def conn(self) -> Connection:
        from dstack.ssh.connection import get_connection

        return get_connection(self.target, name=self.name)

    @property
    def root(self) -> str:
        if self._root is None:
            self._root = f"{self.conn.home}/.dstack"
        return self._root

    def job_dir(self, job_id: str) -> str:
        if not job_id or "/" in job_id or job_id in (".", ".."):
            raise ValueError(f"bad job id {job_id!r}")
        return f"{self.root}/jobs/{job_id}"

    # the Runner interface

    def probe(self) -> Capacity:
        from dstack.hosts import probe

        return probe(self.conn, self.root)

    def start_job(self, ctx: JobContext) -> None:
        from dstack.backends.local import requirements_digest
        from dstack.ssh import process, transfer

        conn = self.conn
        jd = self.job_dir(ctx.job_id)
        entries = list(ctx.code.entries)
        if ctx.spec.repo_include is not None:
            from dstack.repo import _included

            entries = [e for e in entries if _included(e.path, ctx.spec.repo_include)]
        placed = transfer.place(entries, "work")
        base = posixpath.normpath(posixpath.join("work", ctx.working_subdir, ctx.spec.working_dir))
        for dep in ctx.dependencies:
            placed += transfer.place(dep.manifest.entries, base)
        missing = transfer.missing_objects(conn, self.root, (e.digest for _, e in placed))
        sent = transfer.upload_objects(conn, self.root, missing, ctx.store)
        self.last_ship = transfer.ShipResult(len(placed), len(missing), sent)
        passthrough = {k: os.environ[k] for k in ctx.spec.passthrough_env if k in os.environ}
        files = {
            "env.sh": (render_env(job_env(ctx, passthrough)).encode(), 0o600),
            "job.sh": (render_job(ctx, jd, f"{self.root}/venvs", requirements_digest(ctx)).encode(), 0o644),
            "run.sh": (RUN_SH.encode(), 0o755),
            "working_subdir": (ctx.working_subdir.encode() + b"\n", 0o644),
            ".files": (transfer.materialize_records(placed), 0o600),
        }
        # one command lays out the job: scripts, code and dependency artifacts from the cache, then starts it
        q = shlex.quote(jd)
        conn.run_with_writer(
            f"rm -rf {q}/work && mkdir -p {q} && tar -x -f - -C {q} && "
            f"{transfer.materialize_command(self.root, jd)} < {q}/.files && rm -f {q}/.files && "
            f"{process.launch_command(jd)}",
            lambda stdin: _write_tar(stdin, files),
        )

    def poll_job(self, job_id: str) -> JobState:
        from dstack.ssh import process

        state = process.poll(self.conn, self.job_dir(job_id))
        return JobState(state.status, exit_code=state.exit_code, reason=state.reason)

    def poll_jobs(self, job_ids: list[str]) -> dict[str, JobState]:
        """`poll_job` for several jobs in one remote command."""
        from dstack.ssh import process

        states = process.poll_many(self.conn, [self.job_dir(j) for j in job_ids])
        return {
            j: JobState(s.status, exit_code=s.exit_code, reason=s.reason)
            for j, s in zip(job_ids, states, strict=True)
        }

    def read_log(self, job_id: str, offset: int) -> bytes:
        from dstack.ssh import process

        return process.read_file(self.conn, f"{self.job_dir(job_id)}/log", offset)

    def stop_job(self, job_id: str) -> None:
        from dstack.ssh import process

        process.stop(self.conn, self.job_dir(job_id))

    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str | None = None
    ) -> tuple[Manifest, list[str]]:
        from dstack.artifacts import save_artifacts
        from dstack.ssh.transfer import download_paths

        jd = self.job_dir(job_id)
        if working_subdir is None:
            working_subdir = (
                self.conn.run(
                    f"cat {shlex.quote(jd)}/working_subdir 2>/dev/null || echo .", timeout=30
                ).stdout.strip()
                or "."
            )
        base = posixpath.normpath(posixpath.join(jd, "work", working_subdir, spec.working_dir))
        declared = [a.path for a in spec.artifacts]
        remote = [p if p.startswith("/") else posixpath.normpath(p) for p in declared]
        with tempfile.TemporaryDirectory(prefix="dstack-collect-") as tmp:
            missing = set(download_paths(self.conn, base, remote, Path(tmp)))
            present = [(d, r.lstrip("/")) for d, r in zip(declared, remote, strict=True) if r not in missing]
            result = save_artifacts(Path(tmp), [rel for _, rel in present], store)
            self._cache_on_host(jd, base, result.manifest.entries, present)
        return result.manifest, [d for d, r in zip(declared, remote, strict=True) if r in missing]

    def _cache_on_host(
        self, jd: str, base: str, entries: list[ManifestEntry], present: list[tuple[str, str]]
    ) -> None:
        """Copy the job's artifacts into the host's object cache: jobs that use them there get them free."""
        absolute = {rel for declared, rel in present if declared.startswith("/")}
        lines = []
        for e in entries:
            top = e.path
            source = (
                f"/{top}" if any(top == a or top.startswith(a + "/") for a in absolute) else f"{base}/{top}"
            )
            lines.append(f"{'l' if e.is_symlink else 'f'} {e.digest} {source}\n")
        if not lines:
            return
        objects = shlex.quote(f"{self.root}/objects")
        self.conn.run(
            f'mkdir -p {objects} && cd {objects} && while read -r t d p; do [ -e "$d" ] && continue; '
            'if [ "$t" = l ]; then printf %s "$(readlink "$p")" > ".$d.tmp"; else cp "$p" ".$d.tmp"; fi'
            ' 2>/dev/null && chmod 444 ".$d.tmp" && mv -f ".$d.tmp" "$d"; rm -f ".$d.tmp"; done; exit 0',
            input="".join(lines),
            timeout=600,
        )

    def cleanup_job(self, job_id: str, keep: bool = False) -> None:
        if not keep:
            self.conn.run(f"rm -rf {shlex.quote(self.job_dir(job_id))}/work", timeout=120)

    def remove_job(self, job_id: str) -> None:
        """Delete the job's whole directory on the host (log and exit code included)."""
        self.conn.run(f"rm -rf {shlex.quote(self.job_dir(job_id))}", timeout=120)

    def close(self) -> None:
        """Connections are pooled per process (dstack.ssh.connection.close_all closes them)."""


def _write_tar(stdin: IO[bytes], files: dict[str, tuple[bytes, int]]) -> None:
    with tarfile.open(fileobj=stdin, mode="w|") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
