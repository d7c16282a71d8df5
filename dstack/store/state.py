"""The SQLite state: runs, jobs, artifacts, tags, hosts. All SQL of runs/jobs/tags lives here.

WAL mode, schema versioned with numbered migrations (`PRAGMA user_version`), file mode 0600.
Every multi-row change runs in one transaction; placement uses `BEGIN IMMEDIATE` so two
`dstack run` processes never overbook a runner.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import NotFoundError, UsageError
from dstack.store.disk import Connection, disk_error
from dstack.store.reservation import Reservation

if TYPE_CHECKING:
    from dstack.specs import JobSpec

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE runs (
      id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, workflow TEXT NOT NULL, status TEXT NOT NULL,
      project_root TEXT NOT NULL, repo_root TEXT NOT NULL, working_subdir TEXT NOT NULL DEFAULT '.',
      remote_url TEXT, branch TEXT, commit_sha TEXT, diff TEXT, untracked TEXT, code_manifest TEXT,
      variables TEXT NOT NULL DEFAULT '{}', args TEXT NOT NULL DEFAULT '[]', sweep TEXT, reproduce_of TEXT,
      host_pin TEXT, force INTEGER NOT NULL DEFAULT 0, keep INTEGER NOT NULL DEFAULT 0,
      orchestrator_pid INTEGER, orchestrator_start TEXT, reason TEXT,
      created_at REAL NOT NULL, finished_at REAL);
    CREATE INDEX runs_created ON runs(created_at);
    CREATE TABLE jobs (
      id TEXT PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(id), workflow TEXT NOT NULL,
      status TEXT NOT NULL, spec TEXT NOT NULL, key TEXT, upstream TEXT NOT NULL DEFAULT '[]',
      reused_from TEXT, runner TEXT, reserved TEXT, attempt INTEGER NOT NULL DEFAULT 1,
      exit_code INTEGER, reason TEXT, manifest TEXT, log_path TEXT,
      created_at REAL NOT NULL, started_at REAL, finished_at REAL);
    CREATE INDEX jobs_run ON jobs(run_id);
    CREATE INDEX jobs_key ON jobs(key, status);
    CREATE INDEX jobs_status ON jobs(status);
    CREATE TABLE artifacts (
      job_id TEXT NOT NULL REFERENCES jobs(id), path TEXT NOT NULL, size INTEGER NOT NULL,
      mode INTEGER NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (job_id, path));
    CREATE TABLE tags (
      name TEXT PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(id), created_at REAL NOT NULL);
    CREATE TABLE hosts (name TEXT PRIMARY KEY, kind TEXT NOT NULL,
      user TEXT, hostname TEXT, port INTEGER, identity_file TEXT, proxy_jump TEXT, address TEXT,
      host_key TEXT, enabled INTEGER NOT NULL DEFAULT 1, status TEXT NOT NULL DEFAULT 'ready',
      capacity TEXT, cloud TEXT, last_error TEXT, probed_at REAL, created_at REAL NOT NULL,
      last_used_at REAL);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # triggers: what started each run (NULL: by hand), what fired when, which hooks/crontab lines are ours
    """
    ALTER TABLE runs ADD COLUMN origin TEXT;
    CREATE TABLE trigger_fires (
      id INTEGER PRIMARY KEY, project_root TEXT NOT NULL, workflow TEXT NOT NULL, kind TEXT NOT NULL,
      origin TEXT NOT NULL, run_id TEXT, outcome TEXT NOT NULL, fired_at REAL NOT NULL);
    CREATE INDEX trigger_fires_at ON trigger_fires(project_root, workflow, fired_at);
    CREATE TABLE trigger_installs (
      path TEXT PRIMARY KEY, kind TEXT NOT NULL, project_root TEXT NOT NULL,
      detail TEXT NOT NULL DEFAULT '{}',
      installed_at REAL NOT NULL);
    """,
    # 2 (orch): orchestrator heartbeats and bounded restarts; each attempt's log; joining a running job
    """
    ALTER TABLE runs ADD COLUMN heartbeat_at REAL;
    ALTER TABLE runs ADD COLUMN orchestrator_restarts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN orchestrator_restarted_at REAL;
    ALTER TABLE jobs ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN joins TEXT;
    """,
    # storage (issue 19): a deleted run keeps its row (lineage names it) but no longer keeps artifacts
    """
    ALTER TABLE runs ADD COLUMN deleted_at REAL
    """,
]

ACTIVE_JOB = ("pending", "waiting", "starting", "running")
FINISHED_JOB = ("done", "failed", "stopped", "cancelled", "reused")
ACTIVE_RUN = ("pending", "running", "stopping")


@dataclass
class Run:
    id: str
    name: str
    workflow: str
    status: str
    project_root: str = ""
    repo_root: str = ""
    working_subdir: str = "."
    remote_url: str | None = None
    branch: str | None = None
    commit_sha: str | None = None
    diff: str | None = None
    untracked: list[str] = field(default_factory=list)
    code_manifest: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    sweep: str | None = None
    reproduce_of: str | None = None
    host_pin: str | None = None
    force: bool = False
    keep: bool = False
    orchestrator_pid: int | None = None
    orchestrator_start: str | None = None
    reason: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    origin: str | None = None  # what started it: None by hand, "commit SHA", "schedule EXPR", "watch"
    heartbeat_at: float | None = None  # the orchestrator's last loop
    orchestrator_restarts: int = 0
    orchestrator_restarted_at: float | None = None
    deleted_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Run:
        d = dict(row)
        d["untracked"] = json.loads(d["untracked"] or "[]")
        d["variables"] = json.loads(d["variables"] or "{}")
        d["args"] = json.loads(d["args"] or "[]")
        d["force"] = bool(d["force"])
        d["keep"] = bool(d["keep"])
        return cls(**d)


@dataclass
class Job:
    id: str
    run_id: str
    workflow: str
    status: str
    spec_data: dict[str, Any] = field(default_factory=dict)  # the JobSpec as stored; `spec` is its typed view
    key: str | None = None
    upstream: list[str] = field(default_factory=list)
    reused_from: str | None = None
    runner: str | None = None
    reserved: Reservation | None = None
    attempt: int = 1
    exit_code: int | None = None
    reason: str | None = None
    manifest: str | None = None
    log_path: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier ones: attempt, runner, log_path
    joins: str | None = None  # a job of another run with the same key, running now: this one waits for it
    run_name: str = ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["spec_data"] = json.loads(d.pop("spec"))
        d["attempts"] = json.loads(d.get("attempts") or "[]")
        d["upstream"] = json.loads(d["upstream"] or "[]")
        d["reserved"] = Reservation.from_json(json.loads(d["reserved"])) if d["reserved"] else None
        d.setdefault("run_name", "")
        return cls(**d)

    @property
    def spec(self) -> JobSpec:
        """The job's spec, typed: JobSpec's fields read from the stored spec without pydantic (a
        `dstack.spec_view` view; anything but reading a field validates it as a JobSpec then)."""
        typed = self.__dict__.get("_spec")
        if typed is None:
            from dstack.spec_view import spec_view

            typed = self.__dict__["_spec"] = spec_view(self.spec_data)
        return typed

    @property
    def variables(self) -> dict[str, str]:
        """The workflow's resolved variables (read without validating the whole spec)."""
        return dict(self.spec_data.get("variables") or {})


@dataclass
class ArtifactRow:
    job_id: str
    path: str
    size: int
    mode: int
    digest: str


@dataclass
class Tag:
    name: str
    run_id: str
    run_name: str
    created_at: float
    workflows: list[str] = field(default_factory=list)


class State:
    """A connection to the state database with typed reads and writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            from dstack.store.fresh import create_state_file

            create_state_file(path, MIGRATIONS)
        self.db = self._connect()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        new = not self.path.exists()
        try:
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False, factory=Connection
            )
        except sqlite3.OperationalError as e:
            raise disk_error(e, self.path) from e
        db.path = self.path
        if new:
            os.chmod(self.path, 0o600)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version >= len(MIGRATIONS):
            return
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: one writer at a time across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- runs ---------------------------------------------------------------------------------------
    def insert_run(self, run: Run, jobs: list[Job], join: bool = True) -> None:
        """Record a run and its jobs. With `join`, a pending job whose key another run's job has (running, or
        about to) joins that job instead of running again: found and claimed in this one transaction."""
        with self.transaction() as db:
            self._insert_run(db, run, jobs, join)

    def record_run(
        self,
        run: Run,
        jobs: list[Job],
        artifacts: dict[str, tuple[list[ArtifactRow], str]],
        tag: str | None = None,
        replace_tag: bool = False,
    ) -> None:
        """A finished run made elsewhere (a shared tag, `dstack tags add --from`): the run, its jobs, their
        artifacts (job id -> rows, manifest name) and the tag, in one transaction."""
        with self.transaction() as db:
            self._insert_run(db, run, jobs, join=False)
            for job_id, (rows, manifest_name) in artifacts.items():
                self._save_artifact_rows(db, job_id, rows, manifest_name)
            if tag is not None:
                self._add_tag(db, tag, run.id, replace_tag)

    def has_run(self, run_id: str) -> bool:
        """Whether a run with this id is recorded."""
        return self.db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None

    def _insert_run(self, db: sqlite3.Connection, run: Run, jobs: list[Job], join: bool) -> None:
        d = dict(run.__dict__)
        d["untracked"] = json.dumps(d["untracked"])
        d["variables"] = json.dumps(d["variables"])
        d["args"] = json.dumps(d["args"])
        cols = ",".join(d)
        db.execute(f"INSERT INTO runs ({cols}) VALUES ({','.join('?' * len(d))})", list(d.values()))
        for job in jobs:
            if join and job.status == "pending" and job.key:
                row = db.execute(
                    "SELECT jobs.id FROM jobs JOIN runs ON runs.id = jobs.run_id WHERE key = ? "
                    "AND run_id != ? AND runs.deleted_at IS NULL AND (jobs.status IN "
                    "('pending', 'waiting', 'starting', 'running') OR (jobs.status = 'done' AND "
                    "manifest IS NOT NULL)) ORDER BY joins IS NOT NULL, jobs.created_at DESC LIMIT 1",
                    (job.key, run.id),
                ).fetchone()
                job.joins = row[0] if row else None
            self._insert_job(db, job)

    def _insert_job(self, db: sqlite3.Connection, job: Job) -> None:
        d = dict(job.__dict__)
        d.pop("run_name", None)
        d.pop("_spec", None)
        d["spec"] = json.dumps(d.pop("spec_data"))
        d["upstream"] = json.dumps(d["upstream"])
        d["attempts"] = json.dumps(d["attempts"])
        d["reserved"] = json.dumps(job.reserved.to_json()) if job.reserved is not None else None
        cols = ",".join(d)
        db.execute(f"INSERT INTO jobs ({cols}) VALUES ({','.join('?' * len(d))})", list(d.values()))

    def run(self, ref: str) -> Run:
        """A run by id, name or unique prefix of its name."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ? OR name = ?", (ref, ref)).fetchone()
        if row is None:
            rows = self.db.execute(
                "SELECT * FROM runs WHERE name LIKE ? ESCAPE '\\' ORDER BY created_at DESC LIMIT 6",
                (ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
            ).fetchall()
            if len(rows) > 1:
                names = ", ".join(r["name"] for r in rows[:5])
                raise UsageError(f"run prefix '{ref}' matches several runs ({names}) — give more of the name")
            row = rows[0] if rows else None
        if row is None:
            raise NotFoundError(f"no run named '{ref}' — see `dstack runs` for the names")
        return Run.from_row(row)

    def run_named(self, name: str) -> bool:
        """Whether a run has this name."""
        return self.db.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone() is not None

    def host_exists(self, name: str) -> bool:
        """Whether a host of this name is registered."""
        return self.db.execute("SELECT 1 FROM hosts WHERE name = ?", (name,)).fetchone() is not None

    def host_lost(self, name: str, error: str) -> None:
        """Mark a host that stopped answering unreachable, with why."""
        self.db.execute(
            "UPDATE hosts SET status = 'unreachable', last_error = ? WHERE name = ?", (error, name)
        )

    def has_hosts(self, kind: str) -> bool:
        """Whether any host of this kind (`ec2`, `ssh`) is registered."""
        return self.db.execute("SELECT 1 FROM hosts WHERE kind = ? LIMIT 1", (kind,)).fetchone() is not None

    def runs(
        self,
        limit: int | None = None,
        workflow: str | None = None,
        sweep: str | None = None,
        active_only: bool = False,
        include_deleted: bool = True,
    ) -> list[Run]:
        sql, params = "SELECT * FROM runs WHERE 1=1", []  # type: tuple[str, list[Any]]
        if not include_deleted:
            sql += " AND deleted_at IS NULL"
        if workflow:
            sql += " AND workflow = ?"
            params.append(workflow)
        if sweep:
            sql += " AND sweep = ?"
            params.append(sweep)
        if active_only:
            sql += f" AND status IN {ACTIVE_RUN}"
        sql += " ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [Run.from_row(r) for r in self.db.execute(sql, params)]

    def set_run(self, run_id: str, **fields: Any) -> None:
        sets = ",".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])

    def claim_orchestrator(self, run_id: str, pid: int, start: str | None, expect_pid: int | None) -> bool:
        """Become the run's orchestrator if it has none (or the one we expect is gone)."""
        with self.transaction() as db:
            row = db.execute("SELECT orchestrator_pid FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] not in (None, expect_pid):
                return False
            db.execute(
                "UPDATE runs SET orchestrator_pid = ?, orchestrator_start = ?, heartbeat_at = ? WHERE id = ?",
                (pid, start, time.time(), run_id),
            )
            return True

    def beat(self, run_id: str, pid: int) -> bool:
        """The orchestrator's heartbeat; False when another process has taken the run over."""
        cur = self.db.execute(
            "UPDATE runs SET heartbeat_at = ? WHERE id = ? AND orchestrator_pid = ?",
            (time.time(), run_id, pid),
        )
        return cur.rowcount > 0

    def count_restart(self, run_id: str, restarts: int) -> bool:
        """Count one more restart of the run's orchestrator, unless another process just did."""
        cur = self.db.execute(
            "UPDATE runs SET orchestrator_restarts = ?, orchestrator_restarted_at = ? "
            "WHERE id = ? AND orchestrator_restarts = ?",
            (restarts + 1, time.time(), run_id, restarts),
        )
        return cur.rowcount > 0

    # -- jobs ---------------------------------------------------------------------------------------
    def jobs(self, run_id: str | None = None, statuses: tuple[str, ...] | None = None) -> list[Job]:
        sql = "SELECT jobs.*, runs.name AS run_name FROM jobs JOIN runs ON runs.id = jobs.run_id WHERE 1=1"
        params: list[Any] = []
        if run_id:
            sql += " AND run_id = ?"
            params.append(run_id)
        if statuses:
            sql += f" AND jobs.status IN ({','.join('?' * len(statuses))})"
            params.extend(statuses)
        sql += " ORDER BY jobs.created_at, jobs.rowid"
        return [Job.from_row(r) for r in self.db.execute(sql, params)]

    def job(self, job_id: str) -> Job:
        row = self.db.execute(
            "SELECT jobs.*, runs.name AS run_name FROM jobs JOIN runs ON runs.id = jobs.run_id "
            "WHERE jobs.id = ? OR jobs.id LIKE ?",
            (job_id, job_id + "%"),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no job '{job_id}' — see `dstack jobs`")
        return Job.from_row(row)

    def set_job(self, job_id: str, **fields: Any) -> None:
        _encode(fields)
        sets = ",".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id])

    def transition(self, job_id: str, from_statuses: tuple[str, ...], **fields: Any) -> bool:
        """Update a job only if it is still in one of `from_statuses` (so a stop is never overwritten)."""
        _encode(fields)
        sets = ",".join(f"{k} = ?" for k in fields)
        marks = ",".join("?" * len(from_statuses))
        cur = self.db.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})",
            [*fields.values(), job_id, *from_statuses],
        )
        return cur.rowcount > 0

    def reusable_job(self, key: str) -> Job | None:
        """The latest successful job with this key (a reused job points at the original)."""
        row = self.db.execute(
            "SELECT jobs.*, runs.name AS run_name FROM jobs JOIN runs ON runs.id = jobs.run_id "
            "WHERE key = ? AND jobs.status = 'done' AND manifest IS NOT NULL AND runs.deleted_at IS NULL "
            "ORDER BY finished_at DESC LIMIT 1",
            (key,),
        ).fetchone()
        return Job.from_row(row) if row else None

    def reservations(self, runner: str) -> list[Reservation]:
        """What active jobs hold on a runner right now (call inside a transaction); a multi-node job's
        runner names its hosts joined by '+' (dstack.backends.gang): it holds something on each."""
        rows = self.db.execute(
            "SELECT reserved FROM jobs WHERE instr('+' || runner || '+', '+' || ? || '+') > 0 "
            "AND status IN ('starting', 'running') AND reserved IS NOT NULL",
            (runner,),
        ).fetchall()
        return [Reservation.from_json(json.loads(r[0])) for r in rows]

    # -- artifacts ----------------------------------------------------------------------------------
    def save_artifact_rows(
        self, job_id: str, rows: list[ArtifactRow], manifest_name: str, **job_fields: Any
    ) -> None:
        """Record a finished job's artifacts and its final status in one transaction."""
        with self.transaction() as db:
            self._save_artifact_rows(db, job_id, rows, manifest_name, **job_fields)

    def _save_artifact_rows(
        self,
        db: sqlite3.Connection,
        job_id: str,
        rows: list[ArtifactRow],
        manifest_name: str,
        **job_fields: Any,
    ) -> None:
        db.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
        db.executemany(
            "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
            [(job_id, r.path, r.size, r.mode, r.digest) for r in rows],
        )
        fields = {"manifest": manifest_name, **job_fields}
        sets = ",".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id])

    def artifact_rows(self, job_id: str) -> list[ArtifactRow]:
        rows = self.db.execute("SELECT * FROM artifacts WHERE job_id = ? ORDER BY path", (job_id,))
        return [ArtifactRow(**dict(r)) for r in rows]

    # -- tags ---------------------------------------------------------------------------------------
    def add_tag(self, name: str, run_id: str, replace: bool = False) -> None:
        with self.transaction() as db:
            self._add_tag(db, name, run_id, replace)

    def _add_tag(self, db: sqlite3.Connection, name: str, run_id: str, replace: bool) -> None:
        exists = db.execute("SELECT 1 FROM tags WHERE name = ?", (name,)).fetchone()
        if exists and not replace:
            raise UsageError(
                f"tag '{name}' exists — delete it first (`dstack tags delete {name}`)"
                " or pass --force to move it"
            )
        db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (name, run_id, time.time()))

    def tag(self, name: str) -> Tag | None:
        row = self.db.execute(
            "SELECT tags.name, run_id, runs.name AS run_name, tags.created_at FROM tags "
            "JOIN runs ON runs.id = tags.run_id WHERE tags.name = ?",
            (name,),
        ).fetchone()
        return Tag(**dict(row)) if row else None

    def tags(self) -> list[Tag]:
        rows = self.db.execute(
            "SELECT tags.name, run_id, runs.name AS run_name, tags.created_at FROM tags "
            "JOIN runs ON runs.id = tags.run_id ORDER BY tags.created_at DESC"
        ).fetchall()
        result = []
        for r in rows:
            tag = Tag(**dict(r))
            tag.workflows = [
                w[0]
                for w in self.db.execute("SELECT DISTINCT workflow FROM jobs WHERE run_id = ?", (tag.run_id,))
            ]
            result.append(tag)
        return result

    def delete_tag(self, name: str) -> None:
        if self.db.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount == 0:
            raise NotFoundError(f"no tag named '{name}' — see `dstack tags list`")

    # -- deleting runs and what the kept ones reference (issue 19) ---------------------------------
    def mark_runs_deleted(self, run_ids: list[str]) -> None:
        """Mark runs deleted (their rows stay for lineage) and drop their tags, in one transaction."""
        now = time.time()
        with self.transaction() as db:
            for run_id in run_ids:
                db.execute("DELETE FROM tags WHERE run_id = ?", (run_id,))
                db.execute(
                    "UPDATE runs SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL", (now, run_id)
                )

    def runs_older_than(self, before: float, workflow: str | None = None) -> list[Run]:
        """Kept runs created before `before` (a time), oldest first."""
        sql = "SELECT * FROM runs WHERE deleted_at IS NULL AND created_at < ?"
        params: list[Any] = [before]
        if workflow:
            sql += " AND workflow = ?"
            params.append(workflow)
        return [Run.from_row(r) for r in self.db.execute(sql + " ORDER BY created_at", params)]

    def run_tag_names(self, run_id: str) -> list[str]:
        return [
            r[0] for r in self.db.execute("SELECT name FROM tags WHERE run_id = ? ORDER BY name", (run_id,))
        ]

    def kept_manifest_names(self) -> set[str]:
        """Manifests a kept run (or a tag) needs: its code snapshot and its jobs' (reused ones' too)."""
        rows = self.db.execute(
            "SELECT jobs.manifest FROM jobs JOIN runs ON runs.id = jobs.run_id "
            "WHERE jobs.manifest IS NOT NULL AND (runs.deleted_at IS NULL "
            "OR runs.id IN (SELECT run_id FROM tags)) "
            "UNION SELECT code_manifest FROM runs WHERE code_manifest IS NOT NULL AND deleted_at IS NULL"
        )
        return {r[0] for r in rows}

    def deleted_job_ids(self) -> set[str]:
        """Ids of the jobs of deleted runs (their manifests are `jobs/<id>/…`)."""
        rows = self.db.execute(
            "SELECT jobs.id FROM jobs JOIN runs ON runs.id = jobs.run_id WHERE runs.deleted_at IS NOT NULL"
        )
        return {r[0] for r in rows}

    def job_dir_owners(self) -> dict[str, tuple[str, float | None, bool]]:
        """Job id -> (status, finished_at, whether its run is deleted), for every job."""
        rows = self.db.execute(
            "SELECT jobs.id, jobs.status, jobs.finished_at, runs.deleted_at IS NOT NULL "
            "FROM jobs JOIN runs ON runs.id = jobs.run_id"
        )
        return {r[0]: (r[1], r[2], bool(r[3])) for r in rows}

    def usage_rows(self) -> list[tuple[str, str, str, str, int]]:
        """(run name, workflow, tags comma-separated, digest, size) of every kept run's artifact file."""
        rows = self.db.execute(
            "SELECT runs.name, jobs.workflow, "
            "(SELECT group_concat(name, ',') FROM tags WHERE tags.run_id = runs.id), a.digest, a.size "
            "FROM jobs JOIN runs ON runs.id = jobs.run_id "
            "JOIN artifacts a ON a.job_id = COALESCE(jobs.reused_from, jobs.id) "
            "WHERE runs.deleted_at IS NULL ORDER BY runs.created_at"
        )
        return [(r[0], r[1], r[2] or "", r[3], int(r[4])) for r in rows]

    # -- settings -----------------------------------------------------------------------------------
    def setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM settings WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))


def _encode(fields: dict[str, Any]) -> None:
    """JSON columns of jobs, as stored."""
    if "reserved" in fields and fields["reserved"] is not None:
        fields["reserved"] = json.dumps(fields["reserved"].to_json())
    if "attempts" in fields:
        fields["attempts"] = json.dumps(fields["attempts"])


def open_state() -> State:
    """Open (creating and migrating) `$DSTACK_HOME/state.sqlite`."""
    from dstack.home import home

    return State(home() / "state.sqlite")
