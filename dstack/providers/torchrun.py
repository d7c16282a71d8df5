"""`provider: torchrun`: distributed PyTorch training, one process per GPU."""

from __future__ import annotations

import shlex

from dstack.providers.base import Provider, ProviderContext, base_spec, fail, with_definitions
from dstack.providers.devenv import at_least_one_port
from dstack.specs import JobSpec
from dstack.workflows.models import Workflow


class TorchrunProvider(Provider):
    """`torchrun SCRIPT ARGS`, rendezvous on `$PORT_0`; `nodes > 1` needs `$NODE_RANK`, `$MASTER_ADDR`."""

    name = "torchrun"

    def job_spec(self, workflow: Workflow, ctx: ProviderContext) -> JobSpec:
        """One torchrun launcher per node, `nproc_per_node` = the GPU count (1 without GPUs)."""
        if not workflow.script:
            fail(workflow, "the torchrun provider needs a script", hint="add `script: train.py`")
        spec = at_least_one_port(base_spec(workflow, self.name, []))
        nodes = spec.resources.nodes
        nproc = max(1, spec.resources.gpu.count)
        if nodes > 1:
            rdzv = '--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"'
            spec.notices.append(f"workflow '{workflow.name}' asks for {nodes} nodes: each node runs torchrun")
        else:
            rdzv = '--node_rank 0 --master_addr 127.0.0.1 --master_port "$PORT_0"'
        spec.commands = with_definitions(
            [
                *workflow.commands,
                f"torchrun --nnodes {nodes} --nproc_per_node {nproc} {rdzv} "
                f"{shlex.quote(workflow.script)} {workflow.args}".strip(),
            ],
            workflow.variables,
        )
        return spec
