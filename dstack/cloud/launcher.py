"""Renting EC2 instances: choose the cheapest allowed type that fits, launch it tagged, wait for SSH,
terminate it.

Functions here talk to the EC2 API only; `dstack.backends.ec2` ties them to the state (hosts, jobs).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.cloud.aws import HOST_TAG, api_errors, error_code, managed_filters, tag_specs
from dstack.cloud.userdata import user_data
from dstack.errors import CloudError

if TYPE_CHECKING:
    from dstack.cloud.aws import Clients
    from dstack.cloud.config import AwsConfig
    from dstack.cloud.instance_types import InstanceType
    from dstack.specs import JobSpec

LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# the API refusing one offer for these reasons means: try the next offer (another type, region or market)
NEXT_OFFER_CODES = {
    "InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
    "InstanceLimitExceeded", "VcpuLimitExceeded", "Unsupported", "InsufficientFreeAddressesInSubnet",
    "InvalidParameterCombination", "InsufficientCapacityOnHost",
}  # fmt: skip


@dataclass(frozen=True)
class Offer:
    """One way to get a machine: a type in a region, spot or on-demand, at a price (USD/hour)."""

    itype: InstanceType
    region: str
    price: float
    spot: bool

    def describe(self) -> str:
        market = "spot" if self.spot else "on-demand"
        return f"{self.itype.name} in {self.region}, {market} at ${self.price:.3f}/h"


def allowed_types(cfg: AwsConfig) -> list[InstanceType]:
    """The known types the configuration allows."""
    from dstack.cloud.instance_types import matching

    return matching(cfg.instance_types)


def candidates(cfg: AwsConfig, spec: JobSpec) -> list[InstanceType]:
    """Allowed types that fit the job, on-demand price ignored."""
    return [t for t in allowed_types(cfg) if t.fits(spec)]


def spot_prices(ec2: Any, names: list[str], region: str) -> dict[str, float]:
    """The lowest current spot price (over the region's zones) of each type; types with none are left out."""
    from datetime import datetime, timezone

    prices: dict[str, float] = {}
    if not names:
        return prices
    with api_errors("read spot prices", region):
        pages = ec2.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=names,
            ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.now(timezone.utc),
            PaginationConfig={"MaxItems": 1000},
        )
        for page in pages:
            for item in page.get("SpotPriceHistory", []):
                name, price = item["InstanceType"], float(item["SpotPrice"])
                prices[name] = min(price, prices.get(name, price))
    return prices


def offers(clients: Clients, cfg: AwsConfig, spec: JobSpec) -> list[Offer]:
    """Every allowed way to run the job under the price limit, cheapest first (spot before on-demand)."""
    fitting = candidates(cfg, spec)
    result: list[Offer] = []
    for region in cfg.regions:
        if cfg.spot and fitting:
            spot = spot_prices(clients.ec2(region), [t.name for t in fitting], region)
            result += [Offer(t, region, spot[t.name], True) for t in fitting if t.name in spot]
        if cfg.on_demand:
            result += [Offer(t, region, t.price, False) for t in fitting]
    result = [o for o in result if o.price <= cfg.max_price]
    return sorted(result, key=lambda o: (o.price, not o.spot, cfg.regions.index(o.region)))


def refusal(cfg: AwsConfig, spec: JobSpec) -> str:
    """Why no offer exists for the job (for messages)."""
    from dstack.cloud.instance_types import INSTANCE_TYPES

    if not any(t.fits(spec) for t in INSTANCE_TYPES):
        return "no EC2 instance type dstack knows fits it"
    fitting = candidates(cfg, spec)
    if not fitting:
        return f"no allowed instance type fits it (allowed: {', '.join(cfg.instance_types)})"
    if not cfg.spot and not cfg.on_demand:
        return "both spot and on-demand are turned off"
    cheapest = min(fitting, key=lambda t: t.price)
    return (
        f"every fitting instance type costs more than the maximum price ${cfg.max_price:g}/h"
        f" (cheapest on-demand: {cheapest.name} at ${cheapest.price:g}/h)"
    )


# --- key pair, security group, AMI ----------------------------------------------------------------------


def key_pair_name(home: str) -> str:
    return f"dstack-{home}"


def ensure_key_file(key_dir: Path) -> Path:
    """dstack's own SSH key (ed25519) in `key_dir`, made on first use (0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = key_dir / "id_ed25519"
    pub = path.with_suffix(".pub")
    if path.exists() and pub.exists():
        return path
    key_dir.mkdir(parents=True, exist_ok=True)
    key_dir.chmod(0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub.write_bytes(public + b" dstack\n")
    return path


def ensure_key_pair(ec2: Any, cfg: AwsConfig, home: str, key_dir: Path, region: str) -> tuple[str, str]:
    """The key pair instances get and its private key file: the configured one, or dstack's own (imported
    into the region from `key_dir` when missing there)."""
    if cfg.key_name and cfg.key_file:
        return cfg.key_name, cfg.key_file
    path = ensure_key_file(key_dir)
    name = key_pair_name(home)
    with api_errors("look up the key pair", region):
        found = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
    if not found:
        with api_errors("import the key pair", region):
            ec2.import_key_pair(
                KeyName=name,
                PublicKeyMaterial=path.with_suffix(".pub").read_bytes(),
                TagSpecifications=tag_specs("key-pair", home),
            )
    return name, str(path)


def security_group_name(home: str) -> str:
    return f"dstack-{home}"


def ensure_security_group(ec2: Any, cfg: AwsConfig, home: str, region: str) -> str:
    """dstack's security group in the default VPC: SSH in (from `ssh_cidr`), nothing else."""
    name = security_group_name(home)
    with api_errors("look up the security group", region):
        groups = ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [name]}, *managed_filters(home)]
        )["SecurityGroups"]
    if groups:
        return str(groups[0]["GroupId"])
    with api_errors("create the security group", region):
        group = ec2.create_security_group(
            GroupName=name,
            Description="dstack runners: SSH only",
            TagSpecifications=tag_specs("security-group", home),
        )
        ec2.authorize_security_group_ingress(
            GroupId=group["GroupId"],
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": 22,
                    "ToPort": 22,
                    "IpRanges": [{"CidrIp": cfg.ssh_cidr, "Description": "dstack SSH"}],
                }
            ],
        )
    return str(group["GroupId"])


_AMIS: dict[tuple[str, str, str], str] = {}


def resolve_ami(ec2: Any, cfg: AwsConfig, region: str) -> str:
    """The configured AMI id, or the newest available x86_64 image named like `ami_name`."""
    if cfg.ami:
        return cfg.ami
    key = (region, cfg.ami_owner, cfg.ami_name)
    if key not in _AMIS:
        with api_errors("look up the AMI", region):
            images = ec2.describe_images(
                Owners=[cfg.ami_owner],
                Filters=[
                    {"Name": "name", "Values": [cfg.ami_name]},
                    {"Name": "state", "Values": ["available"]},
                    {"Name": "architecture", "Values": ["x86_64"]},
                ],
            )["Images"]
        if not images:
            raise CloudError(
                f"no AMI named like {cfg.ami_name!r} (owner {cfg.ami_owner}) in {region}",
                hint="pass `dstack config aws --ami ami-...` or --ami-name PATTERN",
            )
        _AMIS[key] = max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"]
    return _AMIS[key]


# --- launching, waiting, terminating --------------------------------------------------------------------


def run_instance(
    ec2: Any, cfg: AwsConfig, offer: Offer, *, ami: str, key_name: str, group_id: str, home: str, host: str
) -> dict[str, Any]:
    """Start one instance of the offer (tagged, terminating on shutdown); the API's description of it."""
    extra = {"Name": host, HOST_TAG: host}
    params: dict[str, Any] = {
        "ImageId": ami, "InstanceType": offer.itype.name, "MinCount": 1, "MaxCount": 1,
        "KeyName": key_name, "SecurityGroupIds": [group_id], "UserData": user_data(cfg.idle_timeout),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1",
                                 "Ebs": {"VolumeSize": cfg.disk_gib, "VolumeType": "gp3",
                                         "DeleteOnTermination": True}}],
        "TagSpecifications": tag_specs("instance", home, **extra) + tag_specs("volume", home, **extra),
    }  # fmt: skip
    if offer.spot:
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
                "MaxPrice": f"{cfg.max_price:.4f}",
            },
        }
    with api_errors(f"launch {offer.describe()}", offer.region):
        return dict(ec2.run_instances(**params)["Instances"][0])


def launch(
    clients: Clients, cfg: AwsConfig, choices: list[Offer], *, home: str, host: str, key_dir: Path
) -> tuple[Offer, dict[str, Any], str]:
    """Launch the first offer the API accepts (spot refused: the next, maybe on-demand); returns the offer,
    the instance and the private key file for it."""
    refused: list[str] = []
    for offer in choices:
        ec2 = clients.ec2(offer.region)
        key_name, key_file = ensure_key_pair(ec2, cfg, home, key_dir, offer.region)
        group_id = ensure_security_group(ec2, cfg, home, offer.region)
        ami = resolve_ami(ec2, cfg, offer.region)
        try:
            instance = run_instance(
                ec2, cfg, offer, ami=ami, key_name=key_name, group_id=group_id, home=home, host=host
            )
        except CloudError as exc:
            if error_code(exc) in NEXT_OFFER_CODES:
                refused.append(f"{offer.describe()}: {error_code(exc)}")
                continue
            raise
        return offer, instance, key_file
    raise CloudError(
        "EC2 refused every offer: " + "; ".join(refused[:3]) if refused else "no offer to launch"
    )


def live_instance_ids(clients: Clients, regions: list[str], home: str) -> set[str]:
    """Ids of this home's instances that are not terminated, in `regions`."""
    found: set[str] = set()
    for region in regions:
        filters = [*managed_filters(home), {"Name": "instance-state-name", "Values": LIVE_STATES}]
        with api_errors("list dstack's instances", region):
            for page in clients.ec2(region).get_paginator("describe_instances").paginate(Filters=filters):
                found.update(i["InstanceId"] for r in page["Reservations"] for i in r["Instances"])
    return found


def describe_instances(ec2: Any, ids: list[str], region: str) -> dict[str, dict[str, Any]]:
    """The API's view of instances by id (missing ids: the instance is long gone)."""
    found: dict[str, dict[str, Any]] = {}
    if not ids:
        return found
    with api_errors("describe instances", region):
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": ids}]
        ):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    found[instance["InstanceId"]] = instance
    return found


def wait_running(ec2: Any, instance_id: str, region: str, deadline: float) -> dict[str, Any]:
    """Wait until the instance runs and has an address; CloudError if it ends or time runs out."""
    while True:
        instance = describe_instances(ec2, [instance_id], region).get(instance_id)
        status = instance["State"]["Name"] if instance else "missing"
        if instance is not None and status == "running" and address_of(instance):
            return instance
        if status in ("shutting-down", "terminated", "stopping", "stopped"):
            why = (instance or {}).get("StateReason", {}).get("Message", "")
            raise CloudError(
                f"instance {instance_id} is {status} before it was ready" + (f": {why}" if why else "")
            )
        if time.time() > deadline:
            raise CloudError(f"instance {instance_id} was not running within the launch timeout ({status})")
        time.sleep(2)


def address_of(instance: dict[str, Any]) -> str | None:
    """Where to reach the instance: its public IP, else its private one (from inside the VPC)."""
    return instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")


def wait_ssh(host: str, port: int, deadline: float, interval: float = 2.0) -> None:
    """Wait until an SSH server answers at host:port (its banner); CloudError when time runs out."""
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.settimeout(10)
                if sock.recv(256).startswith(b"SSH-"):
                    return
                last = "something other than SSH answered"
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        if time.time() > deadline:
            raise CloudError(f"SSH did not answer at {host}:{port} within the launch timeout ({last})")
        time.sleep(interval)


def terminate_instances(ec2: Any, ids: list[str], region: str) -> None:
    """Terminate instances (already gone ones are fine)."""
    if not ids:
        return
    try:
        with api_errors("terminate instances", region):
            ec2.terminate_instances(InstanceIds=ids)
    except CloudError as exc:
        if error_code(exc) != "InvalidInstanceID.NotFound":
            raise
