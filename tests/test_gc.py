"""Garbage collection, usage and many-file S3 round trips (issue 19): the real CLI, a real store, SeaweedFS."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import dstack
from s3server import S3Server

from dstack.gc import collect
from dstack.hashing import digest_bytes
from dstack.store import s3 as s3mod
from dstack.store.objects import LocalObjectStore
from dstack.store.s3 import S3ObjectStore
from dstack.store.state import open_state

OWN = 300_000
WORKFLOWS = """\
workflows:
  - name: make
    commands:
      - mkdir -p out
      - printf 'the same in every run\\n' > out/shared.txt
      - head -c 300000 /dev/urandom > out/own.bin
    artifacts: [out]
  - name: writer
    commands: ["mkdir -p out", "head -c 2000000 /dev/urandom > out/a.bin", "sleep 2"]
    artifacts: [out]
"""
NOW = {"DSTACK_GC_GRACE_S": "0"}  # collect at once: everything already written is older than the sweep


def last_run(repo: Path, env: dict[str, str] | None = None) -> str:
    return str(json.loads(dstack("runs", "--json", cwd=repo, env=env).out)[0]["name"])


def gc_json(repo: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    return json.loads(dstack("gc", "--json", *args, cwd=repo, env=env).out)


def freed(report: dict, what: str) -> tuple[int, int]:
    [item] = [f for f in report["freed"] if f["what"] == what]
    return item["count"], item["bytes"]


def objects(home: Path) -> set[str]:
    return {i.name for i in LocalObjectStore(home / "artifacts").list_objects()}


def test_gc_frees_deleted_runs_and_keeps_the_tagged_one(make_repo, dstack_home, tmp_path):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    names = []
    for _ in range(3):
        dstack("run", "make", "--force", "--keep", cwd=repo)
        names.append(last_run(repo))
    first, second, tagged = names
    dstack("tags", "add", "best", tagged, cwd=repo)
    dstack("artifacts", "download", tagged, "-o", str(tmp_path / "before"), cwd=repo)
    dstack("runs", "delete", first, second, cwd=repo)
    stored = objects(dstack_home)

    dry = gc_json(repo, "--dry-run", env=NOW)
    assert dry["dry_run"] is True
    assert freed(dry, "objects") == (2, 2 * OWN)  # the two deleted runs' own files; shared.txt stays
    assert freed(dry, "manifests")[0] == 2
    assert freed(dry, "working directories")[0] == 2  # --keep left them; their runs are deleted
    assert objects(dstack_home) == stored  # --dry-run removes nothing

    real = gc_json(repo, env=NOW)
    assert freed(real, "objects") == freed(dry, "objects")
    assert real["freed_bytes"] >= 2 * OWN
    assert len(objects(dstack_home)) == len(stored) - 2
    assert freed(gc_json(repo, env=NOW), "objects") == (0, 0)  # nothing left to free

    dstack("artifacts", "download", tagged, "-o", str(tmp_path / "after"), cwd=repo)
    for rel in ("out/shared.txt", "out/own.bin"):
        assert (tmp_path / "after" / rel).read_bytes() == (tmp_path / "before" / rel).read_bytes()
    text = dstack("gc", "--dry-run", cwd=repo).err
    assert "Would free 0 B" in text


def test_grace_period_and_freshening_protect_young_objects(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    store = LocalObjectStore(dstack_home / "artifacts")
    data = b"an object a running job is uploading, no manifest yet"
    digest = digest_bytes(data)
    store.put_bytes(data, digest)

    report = gc_json(repo)  # default grace period: an hour
    assert report["spared_young_objects"] == 1 and digest in objects(dstack_home)

    old = time.time() - 7200
    os.utime(store.object_path(digest), (old, old))
    store.put_bytes(data, digest)  # a save finds it there: that freshens it, as in git
    gc_json(repo, env={"DSTACK_GC_GRACE_S": "600"})
    assert digest in objects(dstack_home)

    os.utime(store.object_path(digest), (old, old))
    gc_json(repo, env={"DSTACK_GC_GRACE_S": "600"})
    assert digest not in objects(dstack_home)

    bad = dstack("gc", cwd=repo, env={"DSTACK_GC_GRACE_S": "soon"}, check=False)
    assert bad.code != 0 and "DSTACK_GC_GRACE_S='soon' is not a number" in bad.err


def test_a_job_saving_while_gc_runs_keeps_its_artifacts(make_repo, tmp_path):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    dstack("run", "writer", "-d", cwd=repo)
    name = last_run(repo)
    deadline = time.monotonic() + 60
    sweeps = 0
    while json.loads(dstack("runs", "--json", cwd=repo).out)[0]["status"] != "done":
        gc_json(repo)  # default grace period
        sweeps += 1
        assert time.monotonic() < deadline, "the writer run did not finish"
    gc_json(repo)
    assert sweeps >= 1
    dstack("artifacts", "download", name, "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/out/a.bin").stat().st_size == 2_000_000


def test_old_venvs_go_fresh_ones_stay(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    venvs = dstack_home / "venvs"
    for name, age_days in (("old-python3", 40), ("new-python3", 1)):
        (venvs / name / "bin").mkdir(parents=True)
        (venvs / name / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (venvs / name / ".ready").touch()
        then = time.time() - age_days * 86400
        for p in (venvs / name / "pyvenv.cfg", venvs / name / ".ready", venvs / name):
            os.utime(p, (then, then))
    assert freed(gc_json(repo, "--dry-run"), "cached venvs")[0] == 1
    assert (venvs / "old-python3").exists()
    assert freed(gc_json(repo), "cached venvs")[0] == 1
    assert sorted(p.name for p in venvs.iterdir()) == ["new-python3"]


def test_du_counts_shared_bytes_once(make_repo):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    dstack("run", "make", cwd=repo)
    dstack("tags", "add", "best", last_run(repo), cwd=repo)
    dstack("run", "make", "--force", cwd=repo)
    shared = len("the same in every run\n")
    by_wf = json.loads(dstack("artifacts", "du", "--json", cwd=repo).out)
    assert by_wf["unique_bytes"] == 2 * OWN + shared
    assert by_wf["logical_bytes"] == 2 * (OWN + shared)
    assert by_wf["groups"] == [
        {"name": "make", "files": 4, "bytes": 2 * OWN + shared, "only_here_bytes": 2 * OWN + shared}
    ]
    by_tag = json.loads(dstack("artifacts", "du", "--by", "tag", "--json", cwd=repo).out)
    rows = {g["name"]: g for g in by_tag["groups"]}
    assert rows["best"]["bytes"] == OWN + shared and rows["best"]["only_here_bytes"] == OWN
    assert rows["(untagged)"]["only_here_bytes"] == OWN
    text = dstack("artifacts", "du", "--by", "run", cwd=repo).out
    assert "Only here" in text
    bad = dstack("artifacts", "du", "--by", "size", cwd=repo, check=False)
    assert bad.code != 0 and "--by: unknown grouping 'size'" in bad.err


# -- S3 (SeaweedFS) -------------------------------------------------------------------------------------


def configure(url: str, server: S3Server, cwd: Path, env: dict[str, str] | None = None) -> None:
    dstack(
        "config", "storage", url, "--endpoint-url", server.endpoint_url, "--region", "us-east-1",
        cwd=cwd, env=env,
    )  # fmt: skip


def test_s3_gc_in_a_shared_bucket_keeps_a_colleagues_objects(make_repo, s3_server, s3_url, tmp_path):
    mine = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    configure(s3_url, s3_server, mine)
    colleague = {"DSTACK_HOME": str(tmp_path / "colleague-home"), **NOW}
    theirs = make_repo({".dstack/workflows.yaml": WORKFLOWS}, name="theirs")
    configure(s3_url, s3_server, theirs, colleague)

    dstack("run", "make", cwd=mine)
    doomed = last_run(mine)
    dstack("run", "make", cwd=theirs, env=colleague)  # shares out/shared.txt with my run
    their_run = last_run(theirs, colleague)
    dstack("artifacts", "download", their_run, "-o", str(tmp_path / "before"), cwd=theirs, env=colleague)
    dstack("runs", "delete", doomed, cwd=mine)

    assert freed(gc_json(mine, "--dry-run", env=NOW), "objects") == (1, OWN)
    report = gc_json(mine, env=NOW)
    assert report["shared"] is True
    assert freed(report, "objects") == (1, OWN)  # my own.bin only: shared.txt is in their manifest
    assert freed(report, "manifests")[0] == 1
    # the colleague's gc knows nothing of my runs, yet removes nothing that mine or theirs need
    assert freed(gc_json(theirs, env=colleague), "objects") == (0, 0)
    dstack("artifacts", "download", their_run, "-o", str(tmp_path / "after"), cwd=theirs, env=colleague)
    for rel in ("out/shared.txt", "out/own.bin"):
        assert (tmp_path / "after" / rel).read_bytes() == (tmp_path / "before" / rel).read_bytes()


def test_s3_gc_deletes_in_batches(s3_server, s3_url, dstack_home, monkeypatch: pytest.MonkeyPatch):
    store = S3ObjectStore(s3_url, endpoint_url=s3_server.endpoint_url, region="us-east-1")
    for n in range(5):
        data = f"orphan {n}".encode()
        store.put_bytes(data, digest_bytes(data))
    calls: list[str] = []
    for op in ("DeleteObjects", "DeleteObject", "ListObjectsV2"):
        store.client.meta.events.register(f"before-call.s3.{op}", lambda model, **_: calls.append(model.name))
    monkeypatch.setattr(s3mod, "DELETE_BATCH", 2)
    unfinished = store.client.create_multipart_upload(Bucket=store.bucket, Key=store.object_key("a" * 64))
    time.sleep(1.1)  # S3 times have one-second steps: all of this is now older than the sweep
    with open_state() as state:
        dry = collect(state, store, dry_run=True, grace=0)
        assert calls.count("DeleteObjects") == 0 and dry.freed[0].count == 5
        report = collect(state, store, grace=0)
    assert report.freed[0].count == 5
    assert calls.count("DeleteObjects") == 3  # 5 keys, 2 a request: never one request per object
    assert calls.count("DeleteObject") == 0
    assert list(store.list_objects()) == []
    assert [f.count for f in report.freed if f.what == "unfinished uploads"] == [1]
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.object_key("a" * 64))
    assert unfinished["UploadId"] not in [u["UploadId"] for u in uploads.get("Uploads", [])]


def test_many_files_round_trip_through_s3_with_few_open_files(make_repo, s3_server, s3_url, tmp_path):
    import subprocess
    import sys

    workflows = (
        "workflows:\n  - name: many\n    commands:\n"
        "      - for d in $(seq 0 19); do mkdir -p out/d$d; for f in $(seq 0 49); do "
        'echo "$d/$f" > out/d$d/f$f; done; done\n'
        "    artifacts: [out]\n"
    )
    repo = make_repo({".dstack/workflows.yaml": workflows})
    configure(s3_url, s3_server, repo)

    def limited(*args: str) -> None:  # at most 64 open files for the CLI and what it starts
        proc = subprocess.run(
            ["bash", "-c", 'ulimit -n 64 && exec "$0" -m dstack "$@"', sys.executable, *args],
            cwd=repo, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr

    limited("run", "many")
    limited("artifacts", "download", last_run(repo), "-o", str(tmp_path / "out"))
    files = sorted((tmp_path / "out/out").rglob("f*"))
    assert len(files) == 1000 and (tmp_path / "out/out/d7/f9").read_text() == "7/9\n"
