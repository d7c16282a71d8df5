"""Reading a workflow's resources, ports and time limits: sizes, GPUs, nodes, variables inside them."""

from __future__ import annotations

import math
import re
from typing import Any

from dstack.specs import GpuSpec, PortsSpec, Resources
from dstack.workflows.models import RawResources, RawWorkflow, field_keys
from dstack.workflows.reading import Reader, canonical_keys, copy_map
from dstack.workflows.variables import find_variable
from dstack.workflows.yamlfile import YList, YMap, plain, scalar_text

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
_RESOURCE_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_-]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_DECIMAL = re.compile(r"^\d+\.\d*$")
_GPU_SHORT = re.compile(r"^([A-Za-z0-9_-]+)/gpu$", re.IGNORECASE)
MAX_PORTS = 100
RESOURCE_KEYS = field_keys(RawResources)


def parse_size_mib(text: str) -> int:
    """`64GB`, `512MB`, `1.5GiB`, `4096` (MiB) → MiB; ValueError if it isn't a size."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(text)
    factor = _SIZE_FACTORS[(m.group(2) or "m")[0].lower()]
    return max(1, round(float(m.group(1)) * factor))


def parse_duration_s(text: str) -> int | None:
    """`90s`, `30m`, `2h`, `1d`, `600` (seconds) → seconds; None if it isn't a positive duration."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        return None
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class ResourcesReader(Reader):
    """The resources part of reading a workflow item."""

    def _resources_keys(self, res: YMap) -> YMap:
        canon = canonical_keys(res, RESOURCE_KEYS)
        out = YMap(res.line)
        for key, value in canon.items():
            line = canon.line_of(key)
            short = _GPU_SHORT.match(key)
            if short:  # `v100/gpu: 2`
                if "gpu" in canon:
                    self.fail(f"'resources.{key}' and 'resources.gpu' both set", line, hint="keep one")
                gpu = YMap(line)
                gpu["count"], gpu["name"] = value, short.group(1)
                value, key = gpu, "gpu"
            out[key] = value
            out.lines[key] = line
        self._check_keys(out, RESOURCE_KEYS, "resources.")
        return out

    def _resource_variables(self, item: YMap) -> YMap:
        """Variables in resources, as `${{ gpu }}` or as `$gpu` (`v100/gpu: $gpu`), replaced in a copy; a
        value that becomes a number is one (`gpu: $gpu` with gpu=2 is the count 2)."""

        def substituted(mapping: YMap, where: str) -> YMap:
            out = copy_map(mapping)
            for key, value in mapping.items():
                if not where and key not in ("resources", "gpu", "nodes"):
                    continue
                if isinstance(value, YMap):
                    out[key] = substituted(value, f"{where}{key}.")
                elif isinstance(value, str) and "$" in value:
                    out[key] = self._resource_text(value, f"{where}{key}", mapping.line_of(key))
            return out

        return substituted(item, "")

    def _resource_text(self, value: str, where: str, line: int) -> Any:
        text = value
        for ref in reversed(list(_RESOURCE_REF.finditer(value))):
            found = self._resource_value(ref.group(1) or ref.group(2), where, line)
            text = text[: ref.start()] + found + text[ref.end() :]
        text = self.subst.plain(text, where, line).strip()
        return int(text) if text.isdigit() else float(text) if _DECIMAL.match(text) else text

    def _resource_value(self, name: str, where: str, line: int) -> str:
        found = find_variable(self.subst.variables, name)
        if found is None:
            known = ", ".join(self.subst.variables) or "none"
            self.fail(
                f"unknown variable '${name}' in '{where}'",
                line,
                hint=f"define it in .dstack/variables.yaml (this workflow's variables: {known})",
            )
        return self.subst.variables[found]

    def _resources(self, raw: RawWorkflow) -> Resources:
        res = raw.resources or RawResources.model_validate({})
        rmap = self.item.get("resources")
        rlines = rmap if isinstance(rmap, YMap) else YMap(self.at("resources"))
        out = Resources(
            cpu=res.cpu,
            interruptible=bool(res.interruptible),
            local=bool(res.local),
            remote=bool(res.remote),
        )
        for key, attr in (("memory", "memory_mib"), ("shm_size", "shm_size_mib"), ("disk", "disk_mib")):
            text = getattr(res, key)
            if text is not None:
                try:
                    setattr(out, attr, parse_size_mib(text))
                except ValueError:
                    self.fail(
                        f"'resources.{key}' {text!r} is not a size",
                        rlines.line_of(key),
                        hint="write e.g. 64GB, 512MB or 1.5GiB",
                    )
        gpu, gpu_line = res.gpu, rlines.line_of("gpu")
        if raw.gpu is not None:
            if gpu is not None:
                self.fail("'gpu' is set both at the top and in 'resources'", self.at("gpu"), hint="keep one")
            gpu, gpu_line = raw.gpu, self.at("gpu")
        if gpu is not None:
            out.gpu = self._gpu(gpu, gpu_line)
        if raw.nodes is not None and res.nodes is not None:
            self.fail("'nodes' is set both at the top and in 'resources'", self.at("nodes"), hint="keep one")
        nodes = raw.nodes if raw.nodes is not None else res.nodes
        if nodes is not None:
            if nodes < 1:
                self.fail(
                    "'nodes' must be at least 1", self.at("nodes") if raw.nodes else rlines.line_of("nodes")
                )
            out.nodes = nodes
        if out.cpu is not None and not (math.isfinite(out.cpu) and out.cpu > 0):
            self.fail(f"'resources.cpu' must be a number more than 0, not {out.cpu}", rlines.line_of("cpu"))
        return out

    def _gpu(self, value: Any, line: int) -> GpuSpec:
        if isinstance(value, bool):
            self.fail("'gpu' must be a count, a name or {count, name, memory}", line)
        if isinstance(value, int):
            if value < 0:
                self.fail("'gpu' count can't be negative", line)
            return GpuSpec(count=value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return GpuSpec(count=int(text))
            name, _, count = text.partition(":")
            if count and not count.strip().isdigit():
                self.fail(f"'gpu' {value!r} is not NAME or NAME:COUNT", line)
            return GpuSpec(name=name.strip(), count=int(count) if count else 1)
        if isinstance(value, YMap):
            value = canonical_keys(value, ["count", "name", "memory"])
            self._check_keys(value, ["count", "name", "memory"], "gpu.")
            count = value.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                self.fail("'gpu.count' must be a whole number", value.line_of("count"))
            spec = GpuSpec(count=count)
            if value.get("name") is not None:
                spec.name = scalar_text(value["name"])
            if value.get("memory") is not None:
                try:
                    spec.memory_mib = parse_size_mib(scalar_text(value["memory"]))
                except ValueError:
                    self.fail(
                        f"'gpu.memory' {value['memory']!r} is not a size",
                        value.line_of("memory"),
                        hint="write e.g. 40GB",
                    )
            return spec
        self.fail("'gpu' must be a count, a name or {count, name, memory}", line)

    def _ports(self) -> PortsSpec:
        value = self.item.get("ports")
        line = self.at("ports")
        if value is None:
            return PortsSpec()
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value > MAX_PORTS:
                self.fail(f"'ports: {value}' asks for more than {MAX_PORTS} ports", line)
            return PortsSpec(count=value)
        if isinstance(value, YList):
            fixed = []
            for i, port in enumerate(value):
                if isinstance(port, str) and port.strip().isdigit():
                    port = int(port)
                if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                    self.fail(f"'ports[{i}]' {plain(port)!r} is not a port number", value.line_of(i))
                fixed.append(port)
            if len(fixed) > MAX_PORTS:
                self.fail(f"'ports' lists more than {MAX_PORTS} ports", line)
            return PortsSpec(fixed=fixed)
        self.fail("'ports' must be a count (ports: 2) or a list of port numbers", line)

    def _inactivity(self) -> float | None:
        from dstack.inactivity import parse_duration

        value = self.item.get("inactivity")
        if value is None:
            return None
        seconds = None if isinstance(value, dict | list) else parse_duration(scalar_text(value))
        if seconds is None:
            self.fail(
                f"'inactivity' {plain(value)!r} is not a duration",
                self.at("inactivity"),
                hint="write e.g. `inactivity: 30m` (s, m, h, d) or `inactivity: off`",
            )
        return seconds

    def _max_duration(self) -> int | None:
        value = self.item.get("max_duration")
        if value is None or value is False:
            return None
        seconds = parse_duration_s(scalar_text(value)) if not isinstance(value, bool) else None
        if seconds is None:
            self.fail(
                f"'max_duration' {plain(value)!r} is not a duration",
                self.at("max_duration"),
                hint="write 90s, 30m, 2h, 1d, or a number of seconds",
            )
        return seconds
