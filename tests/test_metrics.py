"""Hardware metrics per job: the sampler next to each job, the mirrored and bounded samples, `dstack metrics`,
utilization in `dstack hosts`, and out-of-memory failures named as such.

No GPU here: GPUs come from a stand-in `nvidia-smi` on PATH that prints nvidia-smi's CSV format, both for
the probe's query (index, name, memory.total) and for the sampler's (utilization, memory, power, temperature).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import docker
import pytest
from helpers import dstack

from dstack.metrics import store
from dstack.metrics.summary import sparkline

FAKE_NVIDIA_SMI = """#!/bin/sh
# stands in for nvidia-smi (no GPU on this machine): two GPUs, in nvidia-smi's csv,noheader,nounits format
case "$1" in
  --query-gpu=index,name,memory.total) printf '0, NVIDIA Fake A100, 40960\\n1, NVIDIA Fake A100, 40960\\n' ;;
  --query-gpu=index,utilization.gpu,*)
    printf '0, 87, 31000, 40960, 251.3, 64\\n1, 3, 512, 40960, [N/A], 35\\n' ;;
  *) exit 9 ;;
esac
"""


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ["PATH"]]))


@pytest.fixture(autouse=True)
def fast_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_METRICS_INTERVAL", "0.3")
    monkeypatch.setenv("DSTACK_METRICS_MIRROR_S", "0.2")


HOG = """\
import sys, time
block = bytearray(int(sys.argv[1]) * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
end = time.time() + float(sys.argv[2])
while time.time() < end:
    pass
"""


def last_run(repo: Path) -> str:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]


def test_a_job_is_sampled_with_its_gpus_and_dstack_metrics_shows_peak_and_mean(make_repo, fake_gpus) -> None:
    repo = make_repo(
        {
            "hog.py": HOG,
            ".dstack/workflows.yaml": "workflows:\n  - name: train\n    resources: {gpu: 1}\n"
            "    commands: ['python hog.py 60 1.5', 'echo trained']\n",
        }
    )
    dstack("run", "train", cwd=repo)
    run = last_run(repo)
    [job] = json.loads(dstack("metrics", run, "--json", cwd=repo).out)
    assert job["workflow"] == "train" and job["samples"] >= 3
    series = job["series"]
    # the whole process tree (bash + python) holds the 60 MiB block and keeps a core busy
    assert series["mem"]["peak"] > 60 * 1024 * 1024
    assert series["cpu"]["peak"] > 5  # a busy core, on a machine shared with other work
    # only the GPU placed on the job (index 0), from one nvidia-smi query per sample
    assert series["gpu0.util"]["peak"] == 87 and series["gpu0.power"]["mean"] == pytest.approx(251.3)
    assert series["gpu0.temp"]["current"] == 64 and job["gpu_memory_total_mib"] == {"gpu0": 40960}
    assert not any(name.startswith("gpu1") for name in series)
    text = dstack("metrics", run, "train", cwd=repo).out
    assert "PEAK" in text and "MEAN" in text and "GPU0 util %" in text and "MiB" in text
    assert any(c in text for c in "▁▂▃▄▅▆▇█")
    # the sampler wrote compact JSON lines next to the job's log, and stopped with the job
    lines = (Path(os.environ["DSTACK_HOME"]) / "jobs" / job["job_id"] / "metrics").read_text().splitlines()
    assert json.loads(lines[0])["gpu"][0][:2] == [0.0, 87.0]


def test_unknown_job_is_one_line_error(make_repo) -> None:
    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: ['true']\n"})
    dstack("run", "a", cwd=repo)
    res = dstack("metrics", last_run(repo), "nope", cwd=repo, check=False)
    assert res.code == 3 and "has no job 'nope'" in res.err and "Traceback" not in res.err


def test_dstack_hosts_shows_utilization_while_a_job_runs(make_repo) -> None:
    repo = make_repo(
        {
            "hog.py": HOG,
            ".dstack/workflows.yaml": "workflows:\n  - name: spin\n    commands: ['python hog.py 10 30']\n",
        }
    )
    dstack("run", "spin", "-d", cwd=repo)
    run = last_run(repo)
    try:
        deadline = time.monotonic() + 40
        usage = None
        while time.monotonic() < deadline and not usage:
            hosts = json.loads(dstack("hosts", "--json", cwd=repo).out)
            usage = next(h for h in hosts if h["name"] == "local").get("usage")
            time.sleep(0.3)
        assert usage and usage["cpu_percent"] > 0 and usage["memory_used"] > 0
        assert usage["memory_total"] > usage["memory_used"]
        table = dstack("hosts", cwd=repo).out
        assert "CPU use" in table and "%" in table
    finally:
        dstack("stop", run, cwd=repo, check=False)


def test_long_jobs_keep_a_bounded_number_of_points_and_exact_totals(monkeypatch) -> None:
    """Downsampling: past MAX_POINTS, neighbouring points merge; peak and mean still count every sample."""
    monkeypatch.setattr(store, "MAX_POINTS", 100)
    lines = [json.dumps({"t": 1000.0 + i, "cpu": float(i % 10), "mem": 1000 + i}) for i in range(1000)]
    data = ("\n".join(lines) + "\n").encode()
    offset = 0
    while offset < len(data):  # in runner-sized chunks, a line cut in two waits for its end
        used = store.ingest("job-x", data[offset : offset + 777])
        offset += used if used else 0
        if not used:
            used = store.ingest("job-x", data[offset : offset + 2000])
            offset += used
    points = store.load_points("job-x")
    totals = store.load_totals("job-x")
    assert totals is not None and totals.samples == 1000 and totals.offset == len(data)
    assert 25 <= len(points) <= 100
    assert totals.series["mem"].peak == 1999 and totals.series["cpu"].mean == pytest.approx(4.5)
    assert points[0]["t"] < points[-1]["t"]
    assert len(store.points_path("job-x").read_bytes()) < 10_000


def test_sparkline_resamples_to_its_width() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(sparkline(list(range(500)), width=30)) == 30
    assert sparkline([]) == ""


def test_a_container_killed_for_memory_says_so_with_its_peak(
    make_repo, docker_engine: docker.DockerClient, python_image: str
) -> None:
    """On Docker the container's own figures are sampled (its cgroup); an OOM kill names itself."""
    repo = make_repo(
        {
            "grow.py": "import time\nb = []\nwhile True:\n    b.append(bytearray(8 * 1024 * 1024))\n"
            "    for i in range(0, len(b[-1]), 4096): b[-1][i] = 1\n    time.sleep(0.25)\n",
            ".dstack/workflows.yaml": f"workflows:\n  - name: big\n    image: {python_image}\n"
            "    resources: {memory: 96MB}\n    commands: ['python3 grow.py']\n",
        }
    )
    res = dstack("run", "big", cwd=repo, check=False, timeout=90)
    assert res.code != 0
    reason = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["reason"]
    assert "job big failed: ran out of memory" in reason, reason
    assert "peak memory" in reason and "of its 96.0 MiB limit" in reason
    [m] = json.loads(dstack("metrics", last_run(repo), "--json", cwd=repo).out)
    assert m["source"] == "docker" and m["memory_limit"] == 96 * 1024 * 1024


def test_samples_of_a_job_on_an_ssh_host_are_mirrored_over_its_connection(
    make_repo, sshd_factory, ssh_pool
) -> None:
    """The sampler runs on the host (its interval from the job's env); the orchestrator reads its file over SFTP."""
    from dstack import hosts
    from dstack.store.state import open_state

    server = sshd_factory.loopback()
    with open_state() as state:
        hosts.add_host(state.db, server.address, name="box", identity=str(server.key), accept=lambda fp: True)
    repo = make_repo(
        {
            "hog.py": HOG,
            ".dstack/workflows.yaml": "workflows:\n  - name: remote\n    env: [DSTACK_METRICS_INTERVAL=0.2]\n"
            "    commands: ['python3 hog.py 30 1.5']\n",
        }
    )
    dstack("run", "remote", "--host", "box", cwd=repo, timeout=90)
    [job] = json.loads(dstack("metrics", last_run(repo), "--json", cwd=repo).out)
    assert job["runner"] == "box" and job["samples"] >= 3
    assert job["series"]["mem"]["peak"] > 30 * 1024 * 1024
    mirrored = Path(os.environ["DSTACK_HOME"]) / "metrics" / f"{job['job_id']}.jsonl"
    assert len(mirrored.read_text().splitlines()) == job["samples"]


def test_follow_refreshes_until_the_run_ends(make_repo) -> None:
    workflows = "workflows:\n  - name: spin\n    commands: ['python hog.py 10 3']\n"
    repo = make_repo({"hog.py": HOG, ".dstack/workflows.yaml": workflows})
    dstack("run", "spin", "-d", cwd=repo)
    res = dstack("metrics", last_run(repo), "--follow", "--json", "--every", "0.5", cwd=repo, timeout=60)
    assert res.out.count('"job_id"') >= 2  # one report per refresh, then it returned by itself
    assert json.loads(dstack("runs", "--json", cwd=repo).out)[0]["status"] == "done"


def test_exit_137_near_the_jobs_memory_limit_reads_as_out_of_memory() -> None:
    """Without a container, the kernel's kill shows as exit 137 with the peak close to what the job asked for."""
    from dstack.metrics.track import oom_reason
    from dstack.store.state import Job

    job = Job(
        id="job-oom",
        run_id="r",
        workflow="w",
        status="running",
        spec_data={"workflow": "w", "resources": {"memory_mib": 100}},
    )
    lines = [{"t": 1.0 + i, "mem": (40 + 6 * i) * 1024 * 1024} for i in range(10)]  # up to 94 MiB
    store.ingest(job.id, "".join(json.dumps(x) + "\n" for x in lines).encode())
    assert oom_reason(job, 137) == (
        "ran out of memory (killed by the kernel, exit 137); peak memory 94.0 MiB of its 100.0 MiB limit"
    )
    assert oom_reason(job, 1) is None  # an ordinary failure
    small = Job(
        id="job-small",
        run_id="r",
        workflow="w",
        status="running",
        spec_data={"workflow": "w", "resources": {"memory_mib": 1000}},
    )
    store.ingest(small.id, b'{"t": 1, "mem": 1000000}\n')
    assert oom_reason(small, 137) is None  # killed, but not for memory


def test_a_job_killed_by_a_signal_is_not_called_out_of_memory(make_repo) -> None:
    repo = make_repo(
        {".dstack/workflows.yaml": "workflows:\n  - name: k\n    commands: ['sleep 1.2', 'kill -9 $$']\n"}
    )
    dstack("run", "k", cwd=repo, check=False)
    reason = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["reason"]
    assert "exited with code 137" in reason and "memory" not in reason
