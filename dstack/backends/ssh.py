"""The SSH runner: jobs run on a registered host, detached, in `~/.dstack/jobs/<job_id>/` there.

Code and dependency artifacts reach the host through its object cache (`~/.dstack/objects/`, see
dstack.ssh.transfer); the job's `env.sh`/`job.sh`/`run.sh` are the same files the local runner writes.
With an S3 store the host fetches what its cache lacks from the bucket and uploads its artifacts there
itself, with pre-signed URLs (dstack.ssh.direct); SSH carries only lists. Where the host can't (no python3,
no BLAKE3 hasher, the bucket unreachable from it) the bytes go over SSH as before, and the job's log and
the orchestrator's log say so.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
import shlex
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dstack.backends.base import Capacity, JobContext, JobState, Runner
from dstack.errors import DstackError, HostError

if TYPE_CHECKING:
    from dstack.specs import JobSpec
    from dstack.ssh.config import SSHTarget
    from dstack.ssh.connection import Connection
    from dstack.ssh.transfer import CollectResult, ShipResult
    from dstack.store.hosts import Host
    from dstack.store.objects import Manifest, ManifestEntry, ObjectStore
    from dstack.store.s3 import S3ObjectStore
    from dstack.store.state import State

log = logging.getLogger("dstack.backends.ssh")
INLINE_BYTES = 64 * 1024  # a job's files that come to no more travel in its launch, not through the cache


@dataclass
class _Start:
    """A job laid out here, to be launched on the host (at once, or with the rest of a scheduler pass)."""

    ctx: JobContext
    jd: str
    placed: list[tuple[str, ManifestEntry]]
    inline: bool = False  # its files go in the launch's tar (a few small ones: no cache to lay out from)


class SSHRunner(Runner):
    """Runs jobs on one SSH host over the process's pooled connection to it."""

    def __init__(self, name: str, target: SSHTarget, root: str | None = None) -> None:
        self.name = name
        self.target = target
        self._root = root  # absolute dstack folder on the host; default: ~/.dstack there
        self.last_ship: ShipResult | None = None  # what the last start_job sent (for benchmarks and tests)
        self.last_collect: CollectResult | None = None  # how the last collect_artifacts stored the files
        # why this host can't fetch from / upload to the bucket itself (found once per process)
        self._no_fetch: str | None = None
        self._no_put: str | None = None
        # a scheduler pass (begin_pass .. end_pass): what one poll of all running jobs said, per job, and
        # the starts and clean-ups sent together at its end
        self._in_pass = False
        self._pass_running = 0  # jobs running here as the pass began
        self._pass_states: dict[str, JobState | HostError] = {}
        self._starts: list[_Start] = []
        self._cleanups: list[str] = []
        # what is known of a job's files on the host: the sizes the pass's poll saw, how much it had printed
        # when its launch ended (for the next read only), its first output
        self._sizes: dict[str, dict[str, int]] = {}
        self._launch_sizes: dict[str, int] = {}
        self._heads: dict[str, bytes] = {}

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
        """Lay out and launch the job; within a scheduler pass the launch goes with the pass's others (a
        big tree, laid out from a spare one by diff, starts on its own)."""
        from dstack.backends import checkout
        from dstack.repo import working_tree
        from dstack.ssh import direct, transfer

        code = working_tree(ctx.code, ctx.working_subdir, ctx.spec.repo_include)  # what the key covers
        self._forget(ctx.job_id)
        if checkout.reuses_trees(code):
            self._start_reusing(ctx, code)
            return
        placed = checkout.place_tree(code.entries, "work")
        base = posixpath.normpath(posixpath.join("work", ctx.working_subdir, ctx.spec.working_dir))
        for dep in ctx.dependencies:
            placed += transfer.place(dep.manifest.entries, base)
        start = _Start(ctx, self.job_dir(ctx.job_id), placed)
        start.inline = (
            direct.s3_store(ctx.store) is None
            and not any(e.is_symlink for _, e in placed)
            and sum(e.size for _, e in placed) <= INLINE_BYTES
        )
        if not self._plain_launch():
            self._start_one(start)
        elif self._in_pass:
            self._starts.append(start)
        else:
            failed = self._launch([start], first_output=True)
            if ctx.job_id in failed:
                raise failed[ctx.job_id]

    def _start_reusing(self, ctx: JobContext, code: Manifest) -> None:
        """Start a job of a big tree: a spare tree of its repo brought up to date by diff (dstack.backends.
        spare), its dependencies' artifacts from the cache, then the launch, in one remote command."""
        from dstack.backends import checkout
        from dstack.ssh import transfer

        conn, jd = self.conn, self.job_dir(ctx.job_id)
        tree = checkout.place_tree(code.entries)
        deps: list[tuple[str, ManifestEntry]] = []
        base = posixpath.normpath(posixpath.join("work", ctx.working_subdir, ctx.spec.working_dir))
        for dep in ctx.dependencies:
            deps += transfer.place(dep.manifest.entries, base)
        missing = checkout.missing_objects(conn, self.root, (e.digest for _, e in [*tree, *deps]))
        _, note, _ = self._bring_objects(ctx, [*tree, *deps], missing)
        q = shlex.quote(jd)
        pool = f"{self.root}/checkouts/{checkout.pool_name(ctx.repo, ctx.spec.repo_include)}"
        records = {".files": (transfer.materialize_records(tree), 0o600)}
        lay_out = f"{checkout.remote_checkout(self.root, jd, pool)} < {q}/.files"
        if deps:
            records[".deps"] = (transfer.materialize_records(deps), 0o600)
            lay_out += f" && {transfer.materialize_command(self.root, jd)} < {q}/.deps"
        files = {
            **self.job_files(ctx, jd, f"{self.root}/venvs", note),
            "working_subdir": (ctx.working_subdir.encode() + b"\n", 0o644),
            **records,
            **self._launch_files(ctx, jd),
        }
        result = conn.run_with_writer(
            f"rm -rf {q}/work && mkdir -p {q} && tar -x -f - -C {q} && {lay_out} && "
            f"rm -f {q}/.files {q}/.deps && {self._launch_command(ctx, jd)}",
            lambda stdin: _write_tar(stdin, files),
        )
        self._launched(ctx, result.stdout)

    def _plain_launch(self) -> bool:
        """Whether jobs start as detached processes (a subclass that submits them differently starts each
        on its own)."""
        cls = type(self)
        return cls._launch_command is SSHRunner._launch_command and cls._launched is SSHRunner._launched

    def _start_one(self, start: _Start) -> None:
        from dstack.backends import checkout
        from dstack.ssh import transfer

        ctx, jd, conn = start.ctx, start.jd, self.conn
        missing = checkout.missing_objects(conn, self.root, (e.digest for _, e in start.placed))
        _, note, _ = self._bring_objects(ctx, start.placed, missing)
        files = self._job_dir_files(start, note)
        # one command lays out the job: scripts, code and dependency artifacts from the cache, then starts it
        q = shlex.quote(jd)
        result = conn.run_with_writer(
            f"rm -rf {q}/work && mkdir -p {q} && tar -x -f - -C {q} && "
            f"{transfer.materialize_command(self.root, jd)} < {q}/.files && rm -f {q}/.files && "
            f"{self._launch_command(ctx, jd)}",
            lambda stdin: _write_tar(stdin, files),
        )
        self._launched(ctx, result.stdout)

    def _job_dir_files(self, start: _Start, note: str) -> dict[str, tuple[bytes, int]]:
        from dstack.ssh import transfer

        ctx, jd = start.ctx, start.jd
        files = {
            **self.job_files(ctx, jd, f"{self.root}/venvs", note),
            "working_subdir": (ctx.working_subdir.encode() + b"\n", 0o644),
            ".files": (b"" if start.inline else transfer.materialize_records(start.placed), 0o600),
            **self._launch_files(ctx, jd),
        }
        if start.inline:  # (paths checked by transfer.place; no symlinks among them to lead elsewhere)
            for path, entry in start.placed:
                files[path] = (ctx.store.get_bytes(entry.digest), entry.mode & 0o755)
        return files

    def _launch(
        self, starts: list[_Start], cleanups: list[str] | None = None, first_output: bool = False
    ) -> dict[str, Exception]:
        """Lay out and launch the jobs (and remove the `cleanups` folders' work trees) in one remote command.

        It is sent as if the host's cache held every input; where it lacks some, the command says so and
        stops before laying anything out, those are brought, and it is sent again. `first_output`: a lone
        job's launch brings back its first output. Returns the jobs that could not start, with why."""
        from dstack.errors import RemoteCommandError
        from dstack.ssh import direct, launch, transfer

        ids = [st.ctx.job_id for st in starts]
        notes = {}
        for st in starts:
            self.last_ship = transfer.ShipResult(len(st.placed))
            if st.inline:
                self.last_ship.bytes_sent = sum(e.size for _, e in st.placed)
            if direct.s3_store(st.ctx.store) is not None:
                notes[st.ctx.job_id] = f"dstack: inputs: all in {self.name}'s cache"
        digests = sorted({e.digest for st in starts if not st.inline for _, e in st.placed})
        out = ""
        for attempt in (1, 2):
            files: dict[str, tuple[bytes, int]] = {}
            for st in starts:
                for name, data in self._job_dir_files(st, notes.get(st.ctx.job_id, "")).items():
                    files[f"{st.ctx.job_id}/{name}"] = data
            if digests:
                files[f"{starts[0].ctx.job_id}/.digests"] = ("\n".join(digests).encode() + b"\n", 0o600)
            script = launch.launch_script(self.root, ids, cleanups or [], bool(digests), first_output)
            out = self.conn.run_with_writer(script, functools.partial(_write_tar, files=files)).stdout
            missing = launch.read_output(out).missing
            if not missing:
                break
            if attempt == 2:
                raise RemoteCommandError(
                    self.name, "lay out jobs", 1, f"objects still missing: {sorted(missing)}"
                )
            cleanups = []
            for st in starts:  # each job's log says how its own inputs arrived
                own = missing & {e.digest for _, e in st.placed}
                _, note, _ = self._bring_objects(st.ctx, st.placed, own)
                missing -= own
                if note:
                    notes[st.ctx.job_id] = note
        done = launch.read_output(out)
        failed: dict[str, Exception] = {
            job_id: RemoteCommandError(self.name, "lay out the job's files", 1, why)
            for job_id, why in done.failed.items()
        }
        self._heads.update(done.heads)
        for job_id in done.started:  # no log yet: nothing printed
            self._launch_sizes[job_id] = done.sizes.get(job_id, 0)
        for st in starts:
            job_id = st.ctx.job_id
            if job_id not in done.started and job_id not in failed:
                failed[job_id] = HostError(f"{self.name}: the job's process did not start within 10s")
        return failed

    def _bring_objects(
        self, ctx: JobContext, placed: list[tuple[str, ManifestEntry]], missing: set[str]
    ) -> tuple[set[str], str, ShipResult]:
        """Put what the host's cache lacks there (from the bucket, else over SSH): (sent over SSH, the job
        log's note on how inputs arrived, what it cost)."""
        from dstack.ssh import direct, transfer

        ship = transfer.ShipResult(len(placed))
        s3 = direct.s3_store(ctx.store)
        over_ssh, note = missing, ""
        if s3 is not None:
            over_ssh, note = self._fetch_from_bucket(
                s3, {e.digest: e.size for _, e in placed if e.digest in missing}, ship
            )
        ship.objects_sent = len(over_ssh)
        ship.bytes_sent = transfer.upload_objects(self.conn, self.root, over_ssh, ctx.store)
        self.last_ship = ship
        return over_ssh, note, ship

    # how the laid-out job is started: detached here; a subclass submits it to a scheduler instead

    def _launch_files(self, ctx: JobContext, jd: str) -> dict[str, tuple[bytes, int]]:
        """More files for the job's directory (beside env.sh, job.sh and run.sh)."""
        return {}

    def _launch_command(self, ctx: JobContext, jd: str) -> str:
        """The shell command that starts the laid-out job."""
        from dstack.ssh import process

        return process.launch_command(jd)

    def _launched(self, ctx: JobContext, output: str) -> None:
        """What the launch command printed (nothing to do for a detached process)."""

    def _fetch_from_bucket(
        self, s3: S3ObjectStore, sizes: dict[str, int], ship: ShipResult
    ) -> tuple[set[str], str]:
        """Have the host fetch what its cache lacks from the bucket: (what must go over SSH, a log note)."""
        from dstack.errors import RemoteCommandError
        from dstack.ssh import direct

        if not sizes:
            return set(), f"dstack: inputs: all in {self.name}'s cache"
        reason = self._no_fetch
        failed: dict[str, str] = dict.fromkeys(sizes, reason or "")
        if reason is None:
            try:
                fetched = direct.fetch_objects(self.conn, self.root, s3, sizes)
            except RemoteCommandError as e:  # no python3 there, most likely
                self._no_fetch = reason = f"the host can't run the fetch: {e.output.strip()[-200:] or e}"
            else:
                ship.objects_fetched, ship.bytes_fetched, failed = (
                    fetched.objects,
                    fetched.bytes,
                    fetched.failed,
                )
                if failed and not fetched.objects:
                    reason = next(iter(failed.values()))
                    if "can't reach the bucket" in reason:
                        self._no_fetch = reason
        note = (
            f"dstack: inputs: {_objects(ship.objects_fetched)} ({_size(ship.bytes_fetched)}) fetched by "
            f"{self.name} from {s3.url} directly"
        )
        if failed:
            why = reason or next(iter(failed.values()))
            note += (
                f"; {_objects(len(failed))} ({_size(sum(sizes[d] for d in failed))}) sent over SSH ({why})"
            )
        log.info("%s", note.removeprefix("dstack: "))
        return set(failed), note

    # a scheduler pass: one poll of every running job first, the starts and clean-ups sent together last

    def begin_pass(self, running: list[str]) -> None:
        """Poll the running jobs in one remote command: what each `poll_job` of this pass answers, with the
        sizes of their logs (a log that has not grown is not read again). HostError if the host does not
        answer (each job's `poll_job` then raises it too)."""
        from dstack.errors import RemoteCommandError
        from dstack.ssh import process

        self._in_pass = True
        self._pass_states, self._sizes, self._launch_sizes = {}, {}, {}
        self._pass_running = len(running)
        if not running or type(self).poll_job is not SSHRunner.poll_job:
            return
        try:
            dirs = [self.job_dir(j) for j in running]
            states = process.poll_many(self.conn, dirs, sizes=("log", "metrics"))
        except RemoteCommandError:
            return  # (each job's own poll says what is wrong)
        except HostError as e:  # unreachable: each job's poll says so without asking the host again
            self._pass_states = dict.fromkeys(running, e)
            raise
        for job_id, st in zip(running, states, strict=True):
            self._pass_states[job_id] = JobState(st.status, exit_code=st.exit_code, reason=st.reason)
            sizes = dict(st.sizes or {})
            if st.status != "running":
                sizes.pop("metrics", None)  # its sampler may add a last sample after the exit
            self._sizes[job_id] = sizes

    def end_pass(self) -> dict[str, Exception]:
        """Send the pass's starts and clean-ups in one remote command; the jobs that could not start."""
        starts, cleanups = self._starts, self._cleanups
        self._starts, self._cleanups, self._in_pass = [], [], False
        self._pass_states, self._sizes = {}, {}
        idle, self._pass_running = not self._pass_running, 0
        try:
            if starts:  # a lone job on an idle host (`dstack run --host`) brings back its first output
                return self._launch(starts, cleanups, idle and not cleanups and len(starts) == 1)
            if cleanups:  # each work tree handed back as a spare for its repo's next job, or removed
                from dstack.backends.checkout import recycle_many

                self.conn.run(recycle_many(cleanups), timeout=120)
        except (DstackError, OSError) as e:  # OSError: e.g. no space left here for the job's files
            if not starts:
                log.warning("could not clean up %d jobs on %s: %s", len(cleanups), self.name, e)
            return {st.ctx.job_id: e for st in starts}
        return {}

    def _forget(self, job_id: str) -> None:
        self._sizes.pop(job_id, None)
        self._launch_sizes.pop(job_id, None)
        self._heads.pop(job_id, None)
        self._pass_states.pop(job_id, None)

    def poll_job(self, job_id: str) -> JobState:
        from dstack.ssh import process

        polled = self._pass_states.pop(job_id, None)
        if isinstance(polled, HostError):
            raise polled
        if polled is not None:
            return polled
        self._sizes.pop(job_id, None)  # newer than what the pass or the launch saw of its files
        self._launch_sizes.pop(job_id, None)
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
        head = self._heads.get(job_id)
        if head is not None and offset < len(head):
            return head[offset:] + self.read_log(job_id, len(head))  # what its launch brought back, and on
        if offset >= self._launch_sizes.pop(job_id, offset + 1):
            return b""  # no more than it had printed as its launch ended
        return self._read(job_id, "log", offset)

    def read_metrics(self, job_id: str, offset: int) -> bytes:
        return self._read(job_id, "metrics", offset)

    def _read(self, job_id: str, name: str, offset: int) -> bytes:
        """A file of the job's from `offset` on: none of it past what the pass's poll saw (so the read asks
        for exactly that much, and a file that has not grown is not read)."""
        from dstack.ssh import process

        known = self._sizes.get(job_id, {}).get(name)
        if known is not None and offset >= known:
            return b""
        limit = process.MAX_LOG_CHUNK if known is None else min(process.MAX_LOG_CHUNK, known - offset)
        return process.read_file(self.conn, f"{self.job_dir(job_id)}/{name}", offset, limit)

    def tcp_table(self) -> str:
        return self.conn.run("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null || :", timeout=30).stdout

    def stop_job(self, job_id: str) -> None:
        from dstack.ssh import process

        self._starts = [st for st in self._starts if st.ctx.job_id != job_id]  # not launched after all
        self._sizes.pop(job_id, None)
        self._launch_sizes.pop(job_id, None)
        process.stop(self.conn, self.job_dir(job_id))

    def collect_artifacts(
        self, job_id: str, spec: JobSpec, store: ObjectStore, working_subdir: str | None = None
    ) -> tuple[Manifest, list[str]]:
        from dstack.artifacts import save_artifacts
        from dstack.ssh import direct
        from dstack.ssh.transfer import CollectResult, download_paths

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
        s3 = direct.s3_store(store)
        if s3 is not None and declared:
            if self._no_put is None:
                done = self._put_to_bucket(s3, jd, base, declared, remote)
                if done is not None:
                    return done
            log.info("%s: artifacts of %s go over SSH: %s", self.name, job_id, self._no_put)
        self.last_collect = CollectResult("ssh", reason=self._no_put or "")
        with tempfile.TemporaryDirectory(prefix="dstack-collect-") as tmp:
            missing = set(download_paths(self.conn, base, remote, Path(tmp)))
            present = [(d, r.lstrip("/")) for d, r in zip(declared, remote, strict=True) if r not in missing]
            result = save_artifacts(Path(tmp), [rel for _, rel in present], store)
            self._cache_on_host(jd, base, result.manifest.entries, present)
        self.last_collect.files = len(result.manifest.entries)
        self.last_collect.objects_over_ssh = result.new_objects
        self._note_skipped(jd, result.skipped)
        return result.manifest, [d for d, r in zip(declared, remote, strict=True) if r in missing]

    def _note_skipped(self, jd: str, skipped: list[str]) -> None:
        """Append to the job's log what its artifacts had that can't be saved (FIFOs, sockets, devices)."""
        from dstack.artifacts import skip_notes

        notes = skip_notes(posixpath.basename(jd), skipped)
        if notes:
            self._sizes.pop(posixpath.basename(jd), None)  # its log grows
            self._launch_sizes.pop(posixpath.basename(jd), None)
            self.conn.run(f"cat >> {shlex.quote(jd)}/log", input=notes, timeout=30)

    def _put_to_bucket(
        self, s3: S3ObjectStore, jd: str, base: str, declared: list[str], remote: list[str]
    ) -> tuple[Manifest, list[str]] | None:
        """Have the host hash its artifacts into its cache and upload what the bucket lacks itself.

        None if the host can't (no python3 or no BLAKE3 hasher there): the caller goes over SSH.
        """
        from dstack.artifacts import _entry_base
        from dstack.errors import RemoteCommandError
        from dstack.ssh import direct
        from dstack.ssh.transfer import CollectResult
        from dstack.store.objects import Manifest, check_digest

        paths = [
            (d, r if r.startswith("/") else f"{base}/{r}", _entry_base(d))
            for d, r in zip(declared, remote, strict=True)
        ]
        try:
            saved = direct.save_on_host(self.conn, self.root, paths, top=base)
        except RemoteCommandError as err:
            self._no_put = f"the host can't hash its artifacts: {err.output.strip()[-200:] or err}"
            return None
        if saved is None:
            self._no_put = "no BLAKE3 hasher on the host (pip install blake3 there, or put b3sum on its PATH)"
            return None
        entries = sorted(saved.entries, key=lambda entry: entry.path)
        manifest = Manifest.model_validate(
            {
                "entries": [
                    {"path": f.path, "size": f.size, "mode": f.mode, "digest": check_digest(f.digest)}
                    for f in entries
                ]
            }
        )
        objects = {f.digest: (f.size, f.sha256) for f in entries}
        todo = direct.missing_in_bucket(s3, objects)
        big = {d for d in todo if objects[d][0] > direct.MAX_PUT_BYTES}
        result = CollectResult("s3", files=len(saved.entries), hasher=saved.hasher)
        failed: dict[str, str] = {}
        small = [(d, *objects[d]) for d in sorted(todo - big)]
        try:
            put = direct.put_objects(self.conn, self.root, s3, small)
            if big and not (put.failed and not put.objects):  # multipart, each part pre-signed (issue 19)
                multi = direct.put_big_objects(self.conn, self.root, s3, [(d, objects[d][0]) for d in big])
                put = direct.Put(
                    put.objects + multi.objects, put.bytes + multi.bytes, {**put.failed, **multi.failed}
                )
            else:
                put.failed.update(dict.fromkeys(big, "skipped: the host could not upload"))
        except RemoteCommandError as err:
            failed.update(dict.fromkeys((d for d, _, _ in small), str(err)))
            failed.update(dict.fromkeys(big, str(err)))
        else:
            result.objects_put, result.bytes_put = put.objects, put.bytes
            failed.update(put.failed)
            if failed and not put.objects and any("can't reach the bucket" in w for w in put.failed.values()):
                self._no_put = next(iter(put.failed.values()))
        if failed:
            result.reason = next(iter(failed.values()))
            result.objects_over_ssh = len(failed)
            self._upload_from_cache(sorted(failed), s3)
        self.last_collect = result
        self._note_skipped(jd, saved.skipped)
        log.info(
            "%s: artifacts: %d files hashed with %s, %d new objects (%s) uploaded by the host to %s%s",
            self.name,
            result.files,
            saved.hasher,
            result.objects_put,
            _size(result.bytes_put),
            s3.url,
            f"; {len(failed)} over SSH ({result.reason})" if failed else "",
        )
        return manifest, saved.missing

    def _upload_from_cache(self, digests: list[str], store: ObjectStore) -> None:
        """Bring objects from the host's cache over SSH and store them (their digests checked here)."""
        from dstack.ssh.transfer import download_paths

        with tempfile.TemporaryDirectory(prefix="dstack-collect-") as tmp:
            download_paths(self.conn, f"{self.root}/objects", digests, Path(tmp))
            for digest in digests:
                store.put_file(Path(tmp) / digest, digest)

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
        """Hand the job's work tree back as a spare for its repo's next job, or remove it (within a scheduler
        pass: with the pass's other remote work)."""
        self._forget(job_id)
        if keep:
            return
        if self._in_pass:
            self._cleanups.append(self.job_dir(job_id))
            return
        from dstack.backends.checkout import remote_recycle

        self.conn.run(remote_recycle(self.job_dir(job_id), job_id), timeout=120)

    def remove_job(self, job_id: str) -> None:
        """Delete the job's whole directory on the host (log and exit code included)."""
        self._forget(job_id)
        self.conn.run(f"rm -rf {shlex.quote(self.job_dir(job_id))}", timeout=120)

    def close(self) -> None:
        """Connections are pooled per process (dstack.ssh.connection.close_all closes them)."""


def warm_up(name: str) -> None:
    """Connect to host `name` (and learn its home folder) in the background, so a run pinned to it finds
    the connection open once it is planned. Nothing for a runner that is not an SSH host; a failure shows
    when the run uses the host."""
    import threading

    def connect() -> None:
        from dstack.hosts import get, target_of
        from dstack.ssh import connection
        from dstack.store.state import open_state

        try:
            with open_state() as state:
                target = target_of(get(state.db, name))
            connection.warm_up(target, name)
        except Exception:  # noqa: BLE001, S110 - the run itself reports it
            pass

    threading.Thread(target=connect, name=f"dstack-warm-{name}", daemon=True).start()


def _objects(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _size(n: int) -> str:
    """A byte count for people: 812 B, 3.0 MB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _write_tar(stdin: IO[bytes], files: dict[str, tuple[bytes, int]]) -> None:
    with tarfile.open(fileobj=stdin, mode="w|") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
