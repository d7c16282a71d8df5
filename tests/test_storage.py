"""Artifacts in S3 (a real SeaweedFS server): a pipeline's outputs and tags shared through one bucket."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import dstack
from s3server import S3Server

PIPELINE = """\
workflows:
  - name: prepare
    commands: ["mkdir -p data", "echo 'rows: 3' > data/set.yaml", "head -c 3000000 /dev/urandom > data/big.bin"]
    artifacts: [data]
  - name: report
    depends-on: ["prepare:shared"]
    commands: [cat data/set.yaml]
"""


def configure(url: str, server: S3Server, cwd: Path, home: Path | None = None) -> None:
    env = {"DSTACK_HOME": str(home)} if home else None
    dstack(
        "config",
        "storage",
        url,
        "--endpoint-url",
        server.endpoint_url,
        "--region",
        "us-east-1",
        cwd=cwd,
        env=env,
    )


def test_pipeline_artifacts_and_tags_shared_through_a_bucket(make_repo, s3_server, tmp_path):
    url = s3_server.new_url()
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    configure(url, s3_server, repo)
    shown = json.loads(dstack("config", "show", "--json", cwd=repo).out)
    assert shown["storage"]["url"] == url
    assert "secret" not in json.dumps(shown).lower()
    dstack("run", "prepare", cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    dstack("tags", "add", "shared", run, cwd=repo)
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=url.split("/", 3)[3])[
            "Contents"
        ]
    ]
    assert any("/objects/" in k for k in keys) and any("/meta/tags/shared" in k for k in keys)

    # A colleague: another checkout, another DSTACK_HOME, the same bucket.
    colleague = tmp_path / "colleague-home"
    env = {"DSTACK_HOME": str(colleague)}
    clone = make_repo({".dstack/workflows.yaml": PIPELINE}, name="clone")
    configure(url, s3_server, clone, colleague)
    tags = json.loads(dstack("tags", "list", "--json", cwd=clone, env=env).out)
    assert [t["name"] for t in tags] == ["shared"]
    res = dstack("run", "report", cwd=clone, env=env)
    assert "rows: 3" in res.out
    out = tmp_path / "downloaded"
    dstack("artifacts", "download", tags[0]["run"], "-o", str(out), cwd=clone, env=env)
    assert (out / "data/set.yaml").read_text() == "rows: 3\n"
    assert (out / "data/big.bin").stat().st_size == 3000000


def test_corrupted_object_is_an_error_naming_the_file(make_repo, s3_server, tmp_path):
    url = s3_server.new_url()
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    configure(url, s3_server, repo)
    dstack("run", "prepare", cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    listing = json.loads(dstack("artifacts", "list", run, "--json", cwd=repo).out)
    digest = next(a["digest"] for a in listing if a["name"] == "data/set.yaml")
    prefix = url.split("/", 3)[3]
    client = s3_server.client()
    key = next(
        o["Key"]
        for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]
        if o["Key"].endswith(digest)
    )
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=b"tampered")
    res = dstack("artifacts", "download", run, "-o", str(tmp_path / "out"), cwd=repo, check=False)
    assert res.code != 0
    assert "data/set.yaml" in res.err or digest[:12] in res.err
    assert "Traceback" not in res.err


def test_unreachable_bucket_is_one_line(make_repo, s3_server):
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    res = dstack(
        "config",
        "storage",
        "s3://no-such-bucket-here/x",
        "--endpoint-url",
        s3_server.endpoint_url,
        cwd=repo,
        check=False,
    )
    assert res.code != 0
    assert "no-such-bucket-here" in res.err and len(res.err.strip().splitlines()) == 1


@pytest.fixture(autouse=True)
def _creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
