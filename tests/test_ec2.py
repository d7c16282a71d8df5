"""On-demand EC2 runners against moto's server mode (the AWS API) with a local sshd per instance.

moto launches no machines: every launched instance is reached at a local sshd instead, through
`DSTACK_EC2_SSH_OVERRIDE=user@127.0.0.1:PORT`. That is the one place where a real instance can't run here;
everything else (offers, spot prices, launch, tags, key pair, security group, termination) is the real
API call against moto, and the host is used over real SSH.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from motoserver import MotoServer, moto_account_fixture, moto_server_fixture  # noqa: F401  (fixtures)
from sshd import (  # noqa: F401  (fixtures)
    SSHServer,
    ssh_keys_fixture,
    ssh_pool_fixture,
    sshd_factory_fixture,
    sshd_fixture,
)
from typer.testing import CliRunner

from dstack.backends import ec2
from dstack.cloud import inventory, launcher, userdata
from dstack.cloud.aws import HOME_TAG, MANAGED_TAG, Clients, home_id, tag_specs, tag_value
from dstack.cloud.config import AwsConfig, configure, load_config
from dstack.cloud.instance_types import BY_NAME, INSTANCE_TYPES, matching
from dstack.errors import CloudError, ConfigError, NotFoundError, UsageError
from dstack.specs import GpuSpec, JobSpec, Resources, RetrySpec
from dstack.store import hosts as store
from dstack.store.reservation import Reservation
from dstack.store.state import Job, Run, State

A10G = JobSpec(workflow="train", resources=Resources(gpu=GpuSpec(count=1, name="A10G")))
FOUR_A10G = JobSpec(workflow="big", resources=Resources(gpu=GpuSpec(count=4, name="a10g")))


@pytest.fixture
def state(dstack_home: Path) -> Iterator[State]:
    from dstack.store.state import open_state

    with open_state() as st:
        yield st


# --- the instance type table and choosing a type (no API) -----------------------------------------------


def test_cheapest_fitting_type_is_chosen_from_the_table() -> None:
    cfg = AwsConfig(instance_types=["*"], max_price=100)

    def cheapest(spec: JobSpec) -> str:
        return min(launcher.candidates(cfg, spec), key=lambda t: t.price).name

    assert cheapest(A10G) == "g5.xlarge"
    assert cheapest(FOUR_A10G) == "g5.12xlarge"
    assert (
        cheapest(
            JobSpec(workflow="t", resources=Resources(memory_mib=60_000, gpu=GpuSpec(count=1, name="A10G")))
        )
        == "g5.4xlarge"
    )
    assert cheapest(JobSpec(workflow="t", resources=Resources(cpu=2))) == "c5.large"
    assert (
        cheapest(JobSpec(workflow="t", resources=Resources(gpu=GpuSpec(count=8, name="H100"))))
        == "p5.48xlarge"
    )
    assert cheapest(JobSpec(workflow="t", resources=Resources(gpu=GpuSpec(count=1)))) == "g4dn.xlarge"
    families = {t.family for t in INSTANCE_TYPES}
    assert {"g4dn", "g5", "g6", "p3", "p4d", "p5", "c5", "m5"} <= families
    assert [t.name for t in matching(["g5.x*"])] == ["g5.xlarge"]
    assert BY_NAME["g5.xlarge"].capacity().gpus[0].name == "NVIDIA A10G"


def test_refusal_says_why_nothing_can_be_launched() -> None:
    assert "no EC2 instance type dstack knows" in launcher.refusal(
        AwsConfig(), JobSpec(workflow="t", resources=Resources(gpu=GpuSpec(count=16)))
    )
    assert "no allowed instance type fits" in launcher.refusal(AwsConfig(instance_types=["c5.*"]), A10G)
    assert "more than the maximum price $0.5/h" in launcher.refusal(AwsConfig(max_price=0.5), A10G)


# --- configuration ---------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    """`dstack config aws` as the lead mounts it (the main CLI wires the same sub-app)."""
    from dstack.cli import aws as aws_cli

    root = typer.Typer()
    config = typer.Typer()
    root.add_typer(config, name="config")

    @config.command("show")
    def show() -> None:  # a second command, so `config` stays a group as in the real CLI
        pass

    config.add_typer(aws_cli.app, name="aws")
    return root


def test_config_aws_sets_prints_and_validates(state: State, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        _cli(),
        [
            "config",
            "aws",
            "--region",
            "eu-west-1",
            "--type",
            "g5.*",
            "--max-price",
            "2",
            "--max-instances",
            "3",
            "--idle-timeout",
            "600",
            "--no-spot",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["regions"] == ["eu-west-1"] and shown["instance_types"] == ["g5.*"]
    assert (shown["spot"], shown["on_demand"], shown["max_price"], shown["max_instances"]) == (
        False,
        True,
        2,
        3,
    )
    assert "Deep Learning" in shown["ami_name"] and shown["key_name"] is None
    res = runner.invoke(_cli(), ["config", "aws", "--spot"])  # only what is given changes
    assert res.exit_code == 0 and "eu-west-1" in res.stdout
    cfg = load_config(state)
    assert cfg is not None and cfg.spot and cfg.regions == ["eu-west-1"] and cfg.idle_timeout == 600
    assert not any(s in (state.setting("aws") or "") for s in ("secret", "testing"))  # nothing secret

    with pytest.raises(UsageError, match="no known instance type matches 'x9.*'"):
        configure(state, instance_types=["x9.*"])
    with pytest.raises(UsageError, match="--key-name needs --key-file"):
        configure(state, key_name="mine")
    with pytest.raises(UsageError, match="max_price: Value error, must be above 0"):
        configure(state, max_price=0)
    key = tmp_path / "k.pem"
    key.write_text("x")
    assert configure(state, key_name="mine", key_file=str(key)).key_file == str(key)
    res = runner.invoke(_cli(), ["config", "aws", "--type", "nope"])
    assert res.exit_code != 0 and isinstance(res.exception, UsageError)
    state.set_setting("aws", '{"max_price": "lots"}')
    with pytest.raises(ConfigError, match="stored AWS settings are invalid"):
        load_config(state)
    assert runner.invoke(_cli(), ["config", "aws", "--off"]).exit_code == 0
    assert load_config(state) is None and ec2.launch_for(state, A10G) is None


# --- the instance's own idle shutdown -------------------------------------------------------------------


def test_idle_check_powers_off_only_after_the_timeout_with_no_job(tmp_path: Path) -> None:
    jobs = tmp_path / "home/.dstack/jobs"
    (jobs / "j1").mkdir(parents=True)
    script = tmp_path / "check.sh"
    script.write_text(userdata.idle_check_script(2))
    off = tmp_path / "off"
    env = {
        **os.environ,
        "DSTACK_IDLE_ROOTS": str(tmp_path / "home/.dstack/jobs"),
        "DSTACK_IDLE_STAMP": str(tmp_path / "stamp"),
        "DSTACK_IDLE_POWEROFF": f"touch {off}",
    }

    def check() -> bool:
        subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
        return off.exists()

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (jobs / "j1/pid").write_text(str(sleeper.pid))
        assert not check()
        time.sleep(2.2)
        assert not check()  # a job runs: never idle
    finally:
        sleeper.kill()
        sleeper.wait()
    (jobs / "j1/exit").write_text("0")
    assert not check()  # the job just ended: the clock starts now
    time.sleep(2.2)
    assert check()
    data = userdata.user_data(900)
    assert "dstack-idle.timer" in data and "idle=${DSTACK_IDLE_TIMEOUT:-1200}" in data
    assert userdata.instance_idle_timeout(60) == 120


# --- against moto -----------------------------------------------------------------------------------------


@pytest.fixture
def cloud(
    moto_account: MotoServer, sshd: SSHServer, state: State, monkeypatch: pytest.MonkeyPatch, ssh_pool: None
) -> Iterator[MotoServer]:
    """AWS configured against moto; every instance is reached at the session's sshd, which authorizes
    dstack's own key (what cloud-init does with the key pair on a real instance)."""
    from dstack.home import sub

    monkeypatch.setenv(ec2.OVERRIDE_ENV, sshd.address)
    configure(
        state, ami_name="Deep Learning AMI Ubuntu Linux*", idle_timeout=60, launch_timeout=30, max_instances=2
    )
    public = launcher.ensure_key_file(sub("aws")).with_suffix(".pub").read_text()
    authorized = sshd.dir / "authorized_keys" / sshd.user
    before = authorized.read_text()
    authorized.write_text(before + public)
    yield moto_account
    authorized.write_text(before)


def _instances(server: MotoServer, home: str | None = None, live: bool = True) -> list[dict]:
    client = server.ec2()
    try:
        filters = [{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
        if home:
            filters.append({"Name": f"tag:{HOME_TAG}", "Values": [home]})
        if live:
            filters.append({"Name": "instance-state-name", "Values": launcher.LIVE_STATES})
        found = client.describe_instances(Filters=filters)["Reservations"]
        return [i for r in found for i in r["Instances"]]
    finally:
        client.close()


def _job_on(state: State, host: str, retry: RetrySpec | None = None, status: str = "running") -> str:
    """A run with one job placed on `host` (rows as the orchestrator writes them)."""
    now = time.time()
    run_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    spec = A10G.model_copy(update={"retry": retry})
    run = Run(
        id=run_id,
        name=f"run-{run_id[:6]}",
        workflow="train",
        status="running",
        project_root="/p",
        repo_root="/p",
        working_subdir=".",
        remote_url=None,
        branch=None,
        commit_sha=None,
        diff=None,
        untracked=[],
        code_manifest=None,
        variables={},
        args=[],
        sweep=None,
        reproduce_of=None,
        host_pin=None,
        force=False,
        keep=False,
        orchestrator_pid=None,
        orchestrator_start=None,
        reason=None,
        created_at=now,
        finished_at=None,
    )
    job = Job(
        id=job_id,
        run_id=run_id,
        workflow="train",
        status=status,
        spec_data=spec.model_dump(),
        key=None,
        upstream=[],
        reused_from=None,
        runner=host,
        reserved=Reservation(cpu=1, memory_mib=0, gpus=[0]),
        attempt=1,
        exit_code=None,
        reason=None,
        manifest=None,
        log_path=None,
        created_at=now,
        started_at=now,
        finished_at=None,
    )
    state.insert_run(run, [job])
    return job_id


def test_a10g_job_launches_a_tagged_g5_that_becomes_a_ready_host(cloud: MotoServer, state: State) -> None:
    from dstack.backends.ssh import SSHRunner
    from dstack.scheduler.placement import available_slots, shortfall

    name = ec2.launch_for(state, A10G)
    assert name is not None
    host = store.get_host(state.db, name)
    assert host is not None and host.kind == "ec2" and host.status == "ready"
    cloud_json = host.cloud or {}
    assert cloud_json["instance_type"] == "g5.xlarge" and cloud_json["spot"] is True
    assert cloud_json["region"] == "us-east-1" and 0 < cloud_json["price"] <= 5 and cloud_json["ready_at"]
    assert host.capacity is not None and [g.name for g in host.capacity.gpus] == ["NVIDIA A10G"]
    # a host like any other: placement sees it and SSHRunner reaches it
    slot = next(s for s in available_slots(state, None) if s.name == name)
    assert shortfall(slot.capacity, A10G) is None
    assert SSHRunner.for_runner(state, name).probe().cpus > 0
    # everything dstack made carries its tags
    home = home_id(state)
    [instance] = _instances(cloud, home)
    assert instance["InstanceId"] == cloud_json["instance_id"] and instance["InstanceType"] == "g5.xlarge"
    assert instance.get("InstanceLifecycle") == "spot" and tag_value(instance, "dstack:host") == name
    client = cloud.ec2()
    try:
        attr = client.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        data = client.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
        import base64

        assert "dstack-idle-check" in base64.b64decode(data["UserData"]["Value"]).decode()
        [group] = client.describe_security_groups(
            GroupIds=[g["GroupId"] for g in instance["SecurityGroups"]]
        )["SecurityGroups"]
        assert tag_value(group, HOME_TAG) == home
        assert [(p["FromPort"], p["ToPort"]) for p in group["IpPermissions"]] == [(22, 22)]
        [pair] = client.describe_key_pairs(KeyNames=[instance["KeyName"]])["KeyPairs"]
        assert tag_value(pair, MANAGED_TAG) == "true" and tag_value(pair, HOME_TAG) == home
    finally:
        client.close()
    info = ec2.describe(state, host)
    assert info["instance_type"] == "g5.xlarge" and info["spot"] is True and info["idle_s"] is not None


def test_an_idle_instance_that_fits_is_reused_not_launched_again(cloud: MotoServer, state: State) -> None:
    from dstack.scheduler.placement import available_slots, reserve

    name = ec2.launch_for(state, A10G)
    assert name is not None
    [slot] = [s for s in available_slots(state, None) if s.name == name]
    assert reserve(slot.capacity, state.reservations(name), A10G) is not None  # the next job goes there
    # a host still launching that fits is waited for, not launched twice
    host = store.get_host(state.db, name)
    assert host is not None
    host.status = "launching"
    with state.transaction() as db:
        store.delete_host(db, name)
        store.insert_host(db, host)
    assert ec2.launch_for(state, A10G) == name
    assert len(_instances(cloud, home_id(state))) == 1


def test_idle_instance_is_terminated_after_the_timeout_busy_one_is_not(
    cloud: MotoServer, state: State
) -> None:
    name = ec2.launch_for(state, A10G)
    assert name is not None
    host = store.get_host(state.db, name)
    assert host is not None
    ready = (host.cloud or {})["ready_at"]
    assert ec2.reap_idle(state, now=ready + 30, min_interval=0) == []  # idle 30s of 60
    job = _job_on(state, name)
    assert ec2.reap_idle(state, now=ready + 120, min_interval=0) == []  # busy: never reaped
    assert ec2.reap_idle(state, now=ready + 130) == []  # rate-limited: not even looked at
    state.set_job(job, status="done", finished_at=ready + 121)
    assert ec2.reap_idle(state, now=ready + 150, min_interval=0) == []  # idle 30s since last seen busy
    [reaped] = ec2.reap_idle(state, now=ready + 200, min_interval=0)
    assert reaped.host == name and reaped.reason == "idle for 80s"
    assert store.get_host(state.db, name) is None
    assert _instances(cloud, home_id(state)) == []
    [gone] = _instances(cloud, home_id(state), live=False)
    assert gone["State"]["Name"] == "terminated"


def test_spot_interruption_places_the_job_again_when_retry_allows(cloud: MotoServer, state: State) -> None:
    # moto can't send a spot interruption: the instance is terminated through the API mid-job instead,
    # which is what AWS does after its two-minute notice
    name = ec2.launch_for(state, A10G)
    assert name is not None
    assert ec2.check_host(state, name) is None  # still running
    retried = _job_on(state, name, retry=RetrySpec(limit=1))
    failed = _job_on(state, name)
    instance_id = ((store.get_host(state.db, name) or store.Host(name="x", kind="ec2")).cloud or {})[
        "instance_id"
    ]
    client = cloud.ec2()
    try:
        client.terminate_instances(InstanceIds=[instance_id])
    finally:
        client.close()
    assert ec2.check_host(state, "local") is None  # not an EC2 host: nothing to ask
    reaped = ec2.check_host(state, name)  # what the orchestrator asks when the host stops answering
    assert reaped is not None and reaped.host == name and sorted(reaped.jobs) == sorted([retried, failed])
    again = state.job(retried)
    assert (again.status, again.attempt, again.runner) == ("pending", 2, None)
    assert "interrupted" in (again.reason or "") and "retrying" in (again.reason or "")
    lost = state.job(failed)
    assert lost.status == "failed" and (lost.reason or "").startswith("interrupted: ")
    assert store.get_host(state.db, name) is None
    # placed again: nothing fits any more, so a new instance is launched for it
    assert ec2.launch_for(state, again.spec) not in (None, name)


def test_an_instance_that_shut_itself_down_is_forgotten(cloud: MotoServer, state: State) -> None:
    # the instance's idle check powers it off (terminating it) even when no dstack command runs;
    # the next reap finds it gone. moto runs no user data: the power-off is the API call here.
    name = ec2.launch_for(state, A10G)
    host = store.get_host(state.db, name or "")
    assert host is not None and host.cloud is not None
    client = cloud.ec2()
    try:
        client.terminate_instances(InstanceIds=[host.cloud["instance_id"]])
    finally:
        client.close()
    [reaped] = ec2.reap_idle(state, min_interval=0)
    assert reaped.host == name and reaped.jobs == [] and "is terminated" in reaped.reason
    assert ec2.ec2_hosts(state) == []


def test_limits_are_hard(cloud: MotoServer, state: State) -> None:
    configure(state, max_instances=1)
    first = ec2.launch_for(state, A10G)
    assert first is not None
    assert ec2.launch_for(state, FOUR_A10G) is None  # would be a second instance
    assert "maximum of 1 instances" in ec2.why_not(state, FOUR_A10G)
    configure(state, max_instances=5, instance_types=["c5.*", "m5.*"])
    assert ec2.launch_for(state, FOUR_A10G) is None  # no allowed type has GPUs
    assert "no allowed instance type fits" in ec2.why_not(state, FOUR_A10G)
    configure(state, instance_types=["g5.*"], spot=False, max_price=5.0)
    assert ec2.launch_for(state, FOUR_A10G) is None  # g5.12xlarge on-demand is $5.672/h
    assert "more than the maximum price $5/h" in ec2.why_not(state, FOUR_A10G)
    with Clients() as clients:
        cfg = load_config(state)
        assert cfg is not None
        for offer in launcher.offers(clients, cfg.model_copy(update={"spot": True}), A10G):
            assert offer.price <= 5.0 and offer.itype.name.startswith("g5.")
    assert len(_instances(cloud, home_id(state))) == 1
    # an instance of this home no host row knows (a launch killed halfway) counts against the limit too
    ec2.terminate(state, first)
    configure(state, max_instances=1, instance_types=["g5.*", "c5.*"], spot=True)
    with Clients() as clients:
        client = clients.ec2("us-east-1")
        image = launcher.resolve_ami(client, load_config(state) or AwsConfig(), "us-east-1")
        client.run_instances(
            ImageId=image,
            InstanceType="c5.large",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=tag_specs("instance", home_id(state)),
        )
    assert ec2.launch_for(state, A10G) is None


def test_on_demand_when_spot_is_off(cloud: MotoServer, state: State) -> None:
    configure(state, spot=False)
    name = ec2.launch_for(state, A10G)
    assert name is not None
    host = store.get_host(state.db, name)
    assert host is not None and host.cloud is not None
    assert host.cloud["spot"] is False and host.cloud["price"] == BY_NAME["g5.xlarge"].price
    [instance] = _instances(cloud, home_id(state))
    assert "InstanceLifecycle" not in instance


def test_a_launch_that_never_answers_leaves_nothing_running(
    cloud: MotoServer, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sshd import _free_port

    monkeypatch.setenv(ec2.OVERRIDE_ENV, f"root@127.0.0.1:{_free_port()}")  # nothing listens there
    configure(state, launch_timeout=1)
    with pytest.raises(CloudError, match="SSH did not answer at 127.0.0.1:"):
        ec2.launch_for(state, A10G)
    assert ec2.ec2_hosts(state) == []
    assert _instances(cloud, home_id(state)) == []


def test_api_refusal_is_a_one_line_cloud_error(
    cloud: MotoServer, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(state, ami_name="no such image *")
    with pytest.raises(
        CloudError, match="no AMI named like 'no such image \\*' \\(owner amazon\\) in us-east-1"
    ):
        ec2.launch_for(state, A10G)
    assert ec2.ec2_hosts(state) == []
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the API can't be reached
    with pytest.raises(CloudError, match="^could not read spot prices in us-east-1: Could not connect"):
        ec2.launch_for(state, A10G)
    assert ec2.ec2_hosts(state) == []


def test_remove_list_and_prune_leave_nothing_tagged(cloud: MotoServer, state: State) -> None:
    name = ec2.launch_for(state, A10G)
    assert name is not None
    home = home_id(state)
    # an instance this home launched but forgot (a launch killed halfway), and one of another home
    with Clients() as clients:
        ec2_client = clients.ec2("us-east-1")
        image = launcher.resolve_ami(ec2_client, load_config(state) or AwsConfig(), "us-east-1")
        orphan = ec2_client.run_instances(
            ImageId=image,
            InstanceType="c5.large",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=tag_specs("instance", home),
        )
        other = ec2_client.run_instances(
            ImageId=image,
            InstanceType="c5.large",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=tag_specs("instance", "someone-else"),
        )
    orphan_id, other_id = orphan["Instances"][0]["InstanceId"], other["Instances"][0]["InstanceId"]
    listed = {e.resource.id: e for e in inventory.list_cloud(state)}
    assert listed[orphan_id].mine and not listed[orphan_id].known
    assert not listed[other_id].mine
    host_instance = (store.get_host(state.db, name).cloud or {})["instance_id"]  # type: ignore[union-attr]
    assert listed[host_instance].known
    assert {e.resource.kind for e in listed.values() if e.mine} == {"instance", "key-pair", "security-group"}

    job = _job_on(state, name)
    with pytest.raises(UsageError, match=f"{name} runs 1 job"):
        ec2.terminate(state, name)
    ec2.terminate(state, name, force=True)
    assert state.job(job).status == "failed"
    assert store.get_host(state.db, name) is None

    pruned = inventory.prune(state)
    assert {r.id for r in pruned.removed if r.kind == "instance"} == {orphan_id}
    assert {r.kind for r in pruned.removed} == {"instance", "key-pair", "security-group"}
    with Clients() as clients:
        assert inventory.list_resources(clients, ["us-east-1"], home) == []
        assert [r.id for r in inventory.list_resources(clients, ["us-east-1"])] == [other_id]
    with pytest.raises(NotFoundError, match="no host named 'nope'"):
        ec2.terminate(state, "nope")


def test_no_aws_configured_costs_nothing(state: State) -> None:
    assert ec2.launch_for(state, A10G) is None
    assert ec2.reap_idle(state) == []
    assert "not configured" in ec2.why_not(state, A10G)
    with pytest.raises(UsageError, match="AWS is not configured"):
        inventory.list_cloud(state)


# --- end to end through the CLI ---------------------------------------------------------------------------


def test_gpu_workflow_launches_g5_runs_there_and_is_terminated_when_idle(
    cloud: MotoServer, state: State, make_repo, cli_runner
) -> None:
    from helpers import dstack

    repo = make_repo({".dstack/workflows.yaml": (
        "workflows:\n  - name: train\n    provider: bash\n"
        "    commands:\n      - echo trained on $(hostname)\n"
        "    resources:\n      gpu:\n        name: A10G\n"
    )})  # fmt: skip
    configure(state, idle_timeout=1)
    state.set_setting("local.enabled", "0")
    res = dstack("run", "train", cwd=repo, timeout=110)
    assert "trained on" in res.out
    runs = json.loads(dstack("runs", "--json", cwd=repo).out)
    assert runs[0]["status"] == "done"
    time.sleep(2)
    ec2.reap_idle(state, min_interval=0)
    assert _instances(cloud, home_id(state)) == []
    assert ec2.ec2_hosts(state) == []
