"""What dstack made in the account: instances, key pairs and security groups carrying its tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dstack.cloud.aws import HOME_TAG, HOST_TAG, api_errors, error_code, managed_filters, tag_value
from dstack.cloud.launcher import LIVE_STATES, terminate_instances
from dstack.errors import CloudError, UsageError

if TYPE_CHECKING:
    from dstack.cloud.aws import Clients
    from dstack.store.state import State


@dataclass
class CloudResource:
    """Something dstack created in the account: an instance, key pair or security group."""

    kind: str  # 'instance' | 'key-pair' | 'security-group'
    id: str
    name: str
    region: str
    home: str | None  # the DSTACK_HOME that made it
    state: str = ""
    instance_type: str = ""
    host: str | None = None  # the dstack host name of an instance


def list_resources(clients: Clients, regions: list[str], home: str | None = None) -> list[CloudResource]:
    """What carries dstack's tags in `regions` (made by this home only when `home` is given)."""
    found: list[CloudResource] = []
    for region in regions:
        ec2 = clients.ec2(region)
        filters = managed_filters(home)
        with api_errors("list dstack's instances", region):
            for page in ec2.get_paginator("describe_instances").paginate(
                Filters=[*filters, {"Name": "instance-state-name", "Values": LIVE_STATES}]
            ):
                for reservation in page["Reservations"]:
                    for i in reservation["Instances"]:
                        found.append(
                            CloudResource(
                                "instance",
                                i["InstanceId"],
                                tag_value(i, "Name") or i["InstanceId"],
                                region,
                                tag_value(i, HOME_TAG),
                                i["State"]["Name"],
                                i["InstanceType"],
                                tag_value(i, HOST_TAG),
                            )
                        )
        with api_errors("list dstack's key pairs", region):
            for k in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]:
                found.append(
                    CloudResource(
                        "key-pair",
                        k.get("KeyPairId", k["KeyName"]),
                        k["KeyName"],
                        region,
                        tag_value(k, HOME_TAG),
                    )
                )
        with api_errors("list dstack's security groups", region):
            for g in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]:
                found.append(
                    CloudResource(
                        "security-group", g["GroupId"], g["GroupName"], region, tag_value(g, HOME_TAG)
                    )
                )
    return found


def delete_resource(clients: Clients, resource: CloudResource) -> str | None:
    """Terminate or delete one resource; a one-line note when the API says not yet (None when done)."""
    ec2 = clients.ec2(resource.region)
    if resource.kind == "instance":
        terminate_instances(ec2, [resource.id], resource.region)
        return None
    try:
        if resource.kind == "key-pair":
            with api_errors(f"delete key pair {resource.name}", resource.region):
                ec2.delete_key_pair(KeyName=resource.name)
        else:
            with api_errors(f"delete security group {resource.id}", resource.region):
                ec2.delete_security_group(GroupId=resource.id)
    except CloudError as exc:
        if error_code(exc) == "DependencyViolation":  # instances still shutting down use it
            return f"{resource.kind} {resource.name} is still in use; prune again in a minute"
        raise
    return None


# --- this DSTACK_HOME's view: what it still knows, and pruning the rest ----------------------------------


@dataclass
class CloudEntry:
    """One thing in the account carrying dstack's tags, and whether this DSTACK_HOME still uses it."""

    resource: CloudResource
    known: bool
    mine: bool  # made by this DSTACK_HOME


def _regions(state: State) -> list[str]:
    """The configured regions and those where this home's hosts run."""
    from dstack.backends.ec2 import ec2_hosts
    from dstack.cloud.config import load_config

    cfg = load_config(state)
    regions = list(cfg.regions) if cfg else []
    for host in ec2_hosts(state):
        region = (host.cloud or {}).get("region")
        if region and region not in regions:
            regions.append(region)
    if not regions:
        raise UsageError("AWS is not configured", hint="run `dstack config aws` first")
    return regions


def list_cloud(state: State) -> list[CloudEntry]:
    """`dstack hosts --cloud`: every instance, key pair and security group with dstack's tags."""
    from dstack.backends.ec2 import ec2_hosts
    from dstack.cloud.aws import Clients, home_id

    home = home_id(state)
    names = {h.name for h in ec2_hosts(state)}
    ids = {(h.cloud or {}).get("instance_id") for h in ec2_hosts(state)}
    with Clients() as clients:
        resources = list_resources(clients, _regions(state), None)
    entries = []
    for r in resources:
        mine = r.home == home
        known = mine and (r.kind != "instance" or r.id in ids or (r.host or "") in names)
        entries.append(CloudEntry(r, known, mine))
    return entries


@dataclass
class Pruned:
    """What `prune` removed, and notes on what it could not remove yet."""

    removed: list[CloudResource] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prune(state: State) -> Pruned:
    """`dstack hosts prune`: terminate this home's instances no host row knows, forget hosts whose instance is
    gone, and delete this home's key pairs and security groups in regions where none of its instances is left
    (they are made again at the next launch)."""
    from dstack.backends.ec2 import ec2_hosts, forget_host, on_spot_interruption
    from dstack.cloud.aws import Clients, home_id

    home = home_id(state)
    result = Pruned()
    regions = _regions(state)
    with Clients() as clients:
        resources = list_resources(clients, regions, home)
        live = {r.id for r in resources if r.kind == "instance"}
        hosts = ec2_hosts(state)
        for host in hosts:
            cloud = host.cloud or {}
            if host.status != "launching" and cloud.get("instance_id") not in live:
                on_spot_interruption(state, host.name, "its instance is gone")
                forget_host(state, host)
                result.notes.append(f"forgot host {host.name}: its instance is gone")
        hosts = ec2_hosts(state)
        names = {h.name for h in hosts}
        ids = {(h.cloud or {}).get("instance_id") for h in hosts}
        for r in resources:
            if r.kind == "instance" and r.id not in ids and (r.host or "") not in names:
                delete_resource(clients, r)
                result.removed.append(r)
        used = {(h.cloud or {}).get("region") for h in hosts}
        for r in resources:
            if r.kind != "instance" and r.region not in used:
                note = delete_resource(clients, r)
                if note:
                    result.notes.append(note)
                else:
                    result.removed.append(r)
    return result
