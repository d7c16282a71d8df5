"""GPU placement: dstack picks the GPUs, two jobs never share one, a container gets them as a device request.

No GPU here: the local runner's GPUs come from a stand-in `nvidia-smi` on PATH (what the probe reads),
and containers are checked at the device-request level (the docker command line and the engine's HostConfig).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import docker
import pytest
from helpers import dstack

from dstack.backends.base import JobContext
from dstack.backends.docker import docker_run_argv
from dstack.specs import GpuSpec, JobSpec, Resources
from dstack.store.objects import Manifest

FAKE_NVIDIA_SMI = """#!/bin/sh
# stands in for nvidia-smi: two GPUs, in the format dstack's probe asks for
printf '0, NVIDIA Fake A100, 40960\\n1, NVIDIA Fake A100, 40960\\n'
"""


@pytest.fixture
def two_fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ["PATH"]]))


def context(gpus: list[int], count: int | None = None, image: str = "img:1") -> JobContext:
    spec = JobSpec(
        workflow="train",
        image=image,
        commands=["nvidia-smi"],
        resources=Resources(gpu=GpuSpec(count=len(gpus) if count is None else count)),
    )
    return JobContext(
        job_id="r-train-abc123",
        run_name="r",
        spec=spec,
        code=Manifest(),
        working_subdir=".",
        dependencies=[],
        store=None,  # type: ignore[arg-type]
        gpu_indexes=gpus,
    )


def test_gpus_become_a_device_request_numbered_from_zero_inside() -> None:
    argv = docker_run_argv(context([0, 2]), "/jobs/r-train-abc123", ["CUDA_VISIBLE_DEVICES", "LR"])
    i = argv.index("--gpus")
    assert argv[i : i + 4] == ["--gpus", '"device=0,2"', "-e", "CUDA_VISIBLE_DEVICES=0,1"]
    assert argv.count("--gpus") == 1
    assert "-e" in argv and "LR" in argv
    assert "CUDA_VISIBLE_DEVICES" not in argv  # the host's value is never passed by name
    assert not any(a.startswith("NVIDIA_VISIBLE_DEVICES") for a in argv)  # docker's NVIDIA hook sets it


def test_a_job_without_gpus_gets_none() -> None:
    argv = docker_run_argv(context([]), "/jobs/r-train-abc123", [])
    assert "--gpus" not in argv
    assert ["-e", "CUDA_VISIBLE_DEVICES=", "-e", "NVIDIA_VISIBLE_DEVICES=void"] == argv[
        argv.index("CUDA_VISIBLE_DEVICES=") - 1 : argv.index("NVIDIA_VISIBLE_DEVICES=void") + 1
    ]


def test_the_engine_reads_the_device_request(docker_engine: docker.DockerClient, busybox_image: str) -> None:
    """The docker CLI turns our flags into HostConfig.DeviceRequests for exactly the chosen GPUs."""
    argv = docker_run_argv(context([1, 3], image=busybox_image), "/tmp", [])
    assert argv[0] == "run"
    name = argv[argv.index("--name") + 1]
    proc = subprocess.run(["docker", "create", *argv[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        host_config = docker_engine.api.inspect_container(name)["HostConfig"]
        [request] = host_config["DeviceRequests"]
        assert request["DeviceIDs"] == ["1", "3"]
        assert request["Capabilities"] == [["gpu"]]
        assert request["Count"] == 0
        assert host_config["NetworkMode"] == "host"
        env = docker_engine.api.inspect_container(name)["Config"]["Env"]
        assert "CUDA_VISIBLE_DEVICES=0,1" in env
    finally:
        docker_engine.api.remove_container(name, force=True)


PARALLEL = """\
workflows:
  - name: g1
    resources: {{gpu: 1}}
    commands: [": g1; {line}"]
  - name: g2
    resources: {{gpu: 1}}
    commands: [": g2; {line}"]
  - name: g3
    resources: {{gpu: 1}}
    commands: [": g3; {line}"]
  - name: cpu
    commands: ["echo cpu cuda=[$CUDA_VISIBLE_DEVICES] nvidia=$NVIDIA_VISIBLE_DEVICES"]
  - name: all
    depends-on: [g1, g2, g3, cpu]
    commands: [echo all]
"""
MARK = 'echo \\"$DSTACK_WORKFLOW $CUDA_VISIBLE_DEVICES $(date +%s.%N)\\" >> $SPANS'
SPAN = f"{MARK}; sleep 1.5; {MARK}"


def test_two_gpu_jobs_never_share_a_gpu(make_repo, tmp_path: Path, two_fake_gpus: None) -> None:
    spans = tmp_path / "spans.txt"
    repo = make_repo({".dstack/workflows.yaml": PARALLEL.format(line=SPAN)})
    res = dstack("run", "all", cwd=repo, timeout=90, env={"SPANS": str(spans)})
    assert "cpu cuda=[] nvidia=void" in res.out
    # each job: (gpu, start, end) from the two lines it wrote
    seen: dict[str, list[tuple[str, float]]] = {}
    for line in spans.read_text().splitlines():
        workflow, gpu, when = line.split()
        seen.setdefault(workflow, []).append((gpu, float(when)))
    assert sorted(seen) == ["g1", "g2", "g3"]
    jobs = [(v[0][0], v[0][1], v[1][1]) for v in seen.values()]
    assert {gpu for gpu, _, _ in jobs} <= {"0", "1"}
    for a in jobs:
        for b in jobs:
            if a is not b and a[1] < b[2] and b[1] < a[2]:  # ran at the same time
                assert a[0] != b[0], f"two jobs shared GPU {a[0]}"
    # only two GPUs: the third job waited for one
    starts = sorted(s for _, s, _ in jobs)
    ends = sorted(e for _, _, e in jobs)
    assert starts[2] >= ends[0] - 0.05


def test_more_gpus_than_the_runner_has_never_fits(make_repo, two_fake_gpus: None) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": "workflows:\n  - name: big\n    resources: {gpu: 3}\n"
            "    commands: [true]\n"
        }
    )
    res = dstack("run", "big", cwd=repo, check=False, timeout=60)
    assert res.code == 4
    assert "GPUs (3 asked, 2 there)" in res.output


def test_an_image_job_asks_the_engine_for_its_gpus(
    make_repo, two_fake_gpus: None, docker_engine: docker.DockerClient, busybox_image: str
) -> None:
    """With no NVIDIA runtime here the engine refuses the device request: that refusal shows it got one."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"workflows:\n  - name: g\n    image: {busybox_image}\n"
            "    resources: {gpu: 1}\n    commands: [nvidia-smi]\n"
        }
    )
    res = dstack("run", "g", cwd=repo, check=False, timeout=60)
    assert res.code == 4
    assert 'could not select device driver "" with capabilities: [[gpu]]' in res.output
    [job_sh] = Path(os.environ["DSTACK_HOME"]).glob("jobs/*/job.sh")
    assert "--gpus '\"device=0\"' -e CUDA_VISIBLE_DEVICES=0 " in job_sh.read_text()
    [run] = json.loads(dstack("runs", "--json", cwd=repo).out)
    assert not docker_engine.containers.list(all=True, filters={"label": f"dstack.run={run['name']}"})
