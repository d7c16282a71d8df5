"""dstack's metrics sampler, shipped next to each job as `sampler.py` and started once by `run.sh`.

`python3 sampler.py LEADER` appends one JSON line per sample to `./metrics` until `./exit` appears or the
wrapper (pid LEADER, also the job's session) is gone. Each sample sums the job's whole process tree (every
process in the session) from /proc, the job's container from its cgroup files (docker stats as a fallback),
and its GPUs from one `nvidia-smi` query. Standard library only: it runs with any python3 on a host.
"""

import json
import os
import subprocess
import sys
import time

GPU_QUERY = "index,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu"
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return ""


def job_settings():
    """(CUDA_VISIBLE_DEVICES or None when unset, interval in seconds) from the job's env.sh."""
    script = (
        '. ./env.sh >/dev/null 2>&1; printf "%s|%s|%s" "${CUDA_VISIBLE_DEVICES+set}" '
        '"$CUDA_VISIBLE_DEVICES" "$DSTACK_METRICS_INTERVAL"'
    )
    out = os.environ.get("DSTACK_SAMPLER_SETTINGS")  # read by run.sh from env.sh
    if out is None:
        try:
            out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = "||"
    isset, devices, interval = (out.split("|") + ["", "", ""])[:3]
    value = interval or os.environ.get("DSTACK_METRICS_INTERVAL") or "5"
    try:
        seconds = max(0.1, float(value))
    except ValueError:
        seconds = 5.0
    return (devices if isset else None), seconds


def session_processes(session, skip):
    """{pid: (cpu ticks, rss bytes, read bytes, written bytes)} of every live process in the session."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        stat = read(f"/proc/{name}/stat")
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) < 22 or fields[3] != str(session) or fields[0] == "Z":
            continue
        io = {}
        for line in read(f"/proc/{name}/io").splitlines():
            key, _, value = line.partition(":")
            io[key] = int(value or 0)
        found[int(name)] = (
            int(fields[11]) + int(fields[12]),
            int(fields[21]) * PAGE,
            io.get("read_bytes", 0),
            io.get("write_bytes", 0),
        )
    return found


def own_cgroup():
    """The memory cgroup folder the job runs in (v2 unified, else v1 memory controller), or None."""
    for line in read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "memory" or (parts[0] == "0" and parts[1] == "")):
            base = "/sys/fs/cgroup/memory" if parts[1] == "memory" else "/sys/fs/cgroup"
            path = base + parts[2].rstrip("/")
            if os.path.isdir(path):
                return path
    return None


def cgroup_peak(path):
    """The cgroup's memory high-water mark (v2 memory.peak, v1 max_usage_in_bytes), 0 if it keeps none."""
    for name in ("/memory.peak", "/memory.max_usage_in_bytes"):
        text = read(path + name).strip()
        if text.isdigit():
            return int(text)
    return 0


def cgroup_memory(path):
    """(usage, limit, oom kills, cpu ns, read bytes, written bytes) of a cgroup folder, v1 or v2."""
    values = {}
    if os.path.exists(path + "/memory.current"):  # v2
        usage = int(read(path + "/memory.current") or 0)
        for line in read(path + "/memory.stat").splitlines():
            if line.startswith("inactive_file "):
                usage -= int(line.split()[1])
        limit = read(path + "/memory.max").strip()
        for line in read(path + "/memory.events").splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value or 0)
        cpu = 0
        for line in read(path + "/cpu.stat").splitlines():
            if line.startswith("usage_usec "):
                cpu = int(line.split()[1]) * 1000
        rd = wr = 0
        for line in read(path + "/io.stat").splitlines():
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                rd += int(value) if key == "rbytes" else 0
                wr += int(value) if key == "wbytes" else 0
        return max(usage, 0), int(limit) if limit.isdigit() else 0, values.get("oom_kill", 0), cpu, rd, wr
    usage = int(read(path + "/memory.usage_in_bytes") or 0)
    for line in read(path + "/memory.stat").splitlines():
        if line.startswith("total_inactive_file "):
            usage -= int(line.split()[1])
    limit = int(read(path + "/memory.limit_in_bytes") or 0)
    for line in read(path + "/memory.oom_control").splitlines():
        key, _, value = line.partition(" ")
        values[key] = int(value or 0)
    other = path.replace("/memory/", "/cpuacct/", 1)
    cpu = int(read(other + "/cpuacct.usage") or 0)
    rd = wr = 0
    for line in read(
        path.replace("/memory/", "/blkio/", 1) + "/blkio.throttle.io_service_bytes"
    ).splitlines():
        words = line.split()
        if len(words) == 3 and words[1] == "Read":
            rd += int(words[2])
        elif len(words) == 3 and words[1] == "Write":
            wr += int(words[2])
    return max(usage, 0), limit if limit < 1 << 60 else 0, values.get("oom_kill", 0), cpu, rd, wr


def container_cgroup(name):
    """The cgroup folder of the job's container (by its name in ./container), or None if not found."""
    try:
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}}", name],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None, None
    if len(out) != 2 or out[1] == "0":
        return None, None
    cid, pid = out
    for line in read(f"/proc/{pid}/cgroup").splitlines():  # where its engine put it, as this host sees it
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] == "memory":
            path = "/sys/fs/cgroup/memory" + parts[2].rstrip("/")
        elif len(parts) == 3 and parts[0] == "0" and parts[1] == "" and parts[2] not in ("", "/"):
            path = "/sys/fs/cgroup" + parts[2].rstrip("/")
        else:
            continue
        if os.path.exists(path + "/memory.current") or os.path.exists(path + "/memory.usage_in_bytes"):
            return cid, path
    for path in (
        f"/sys/fs/cgroup/system.slice/docker-{cid}.scope",
        f"/sys/fs/cgroup/docker/{cid}",
        f"/sys/fs/cgroup/memory/docker/{cid}",
        f"/sys/fs/cgroup/memory/system.slice/docker-{cid}.scope",
    ):
        if os.path.isdir(path):
            return cid, path
    return cid, None


def docker_stats(cid):
    """(memory bytes, cpu %) from `docker stats --no-stream` (when the cgroup files can't be read)."""
    units = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1000, "MB": 1000**2, "GB": 1000**3}
    try:
        out = subprocess.run(
            ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}|{{.CPUPerc}}", cid],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        mem, cpu = out.split("|")
        used = mem.split("/")[0].strip()
        number = used.rstrip("KMGiBk")
        return int(float(number) * units.get(used[len(number) :], 1)), float(cpu.rstrip("%"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def gpu_sample(devices):
    """[[index, util %, memory used MiB, memory total MiB, power W, temperature C], ...] of the job's GPUs."""
    wanted = None if devices is None else {d.strip() for d in devices.split(",") if d.strip()}
    if wanted is not None and not wanted:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=" + GPU_QUERY, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 6 or (wanted is not None and cells[0] not in wanted):
            continue
        row: list = []
        for cell in cells[:6]:
            try:
                row.append(round(float(cell), 1))
            except ValueError:  # [N/A], [Not Supported]
                row.append(None)
        gpus.append(row)
    return gpus


def host_cpu():
    """(busy, total) jiffies of the whole host."""
    words = read("/proc/stat").split("\n", 1)[0].split()[1:]
    values = [int(w) for w in words if w.isdigit()]
    idle = sum(values[3:5]) if len(values) >= 5 else 0
    return sum(values) - idle, sum(values)


def host_memory():
    info = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) * 1024 if value.split() else 0
    total = info.get("MemTotal", 0)
    return total - info.get("MemAvailable", total), total


def main():
    leader = int(sys.argv[1])
    devices, interval = job_settings()
    skip = {os.getpid()}
    own = own_cgroup()
    prev: dict = {}
    prev_host = host_cpu()
    prev_ctr = None
    ctr_name, ctr_id, ctr_path, ctr_tries = "", None, None, 0
    last = time.monotonic()
    out = open("metrics", "a")
    count = 0
    # the first samples come sooner (0.5, 1, 2 s… into the job), so short jobs get some too; run.sh starts
    # the sampler 0.4 s in and says how long its first wait is
    wait = float(sys.argv[2]) if len(sys.argv) > 2 else min(0.5, interval)
    while True:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if os.path.exists("exit"):
                return
            try:
                os.kill(leader, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(min(0.25, max(0.01, deadline - time.monotonic())))
        wait = min(wait * 2, interval) if count < 10000 else interval * 4  # a week-long job: small file
        now = time.monotonic()
        dt = max(now - last, 1e-3)
        last = now
        procs = session_processes(leader, skip)
        if not procs or os.path.exists("exit"):
            return  # the job ended while we slept: a sample now would read as zero
        cpu = rd = wr = 0.0
        for pid, (ticks, _, r, w) in procs.items():
            before = prev.get(pid, (0, 0, 0, 0))
            cpu += max(ticks - before[0], 0) / TICK
            rd += max(r - before[2], 0)
            wr += max(w - before[3], 0)
        prev = procs
        sample = {
            "t": round(time.time(), 2),
            "cpu": round(cpu / dt * 100, 1),
            "mem": sum(p[1] for p in procs.values()),
            "rd": int(rd / dt),
            "wr": int(wr / dt),
            "n": len(procs),
        }
        name = read("container").strip()
        if name and name != ctr_name and ctr_tries < 20:
            ctr_tries += 1
            ctr_id, ctr_path = container_cgroup(name)
            if ctr_id:
                ctr_name = name
        cgroup = ctr_path if ctr_name else own
        if ctr_name and ctr_path and not os.path.isdir(ctr_path):
            cgroup = None  # the container is gone: its last figures stand
        elif cgroup:
            usage, limit, ooms, cpu_ns, crd, cwr = cgroup_memory(cgroup)
            sample["lim"], sample["oom"] = limit, ooms
            if ctr_name and (usage or cpu_ns):
                sample["src"] = "docker"
                sample["mem"] = usage
                sample["peak"] = cgroup_peak(cgroup)
                if prev_ctr is not None:
                    sample["cpu"] = round(max(cpu_ns - prev_ctr[0], 0) / 1e9 / dt * 100, 1)
                    sample["rd"] = int(max(crd - prev_ctr[1], 0) / dt)
                    sample["wr"] = int(max(cwr - prev_ctr[2], 0) / dt)
                prev_ctr = (cpu_ns, crd, cwr)
        elif ctr_id and not ctr_path:
            stats = docker_stats(ctr_id)
            if stats:
                sample["src"] = "docker"
                sample["mem"], sample["cpu"] = stats
        gpus = gpu_sample(devices)
        if gpus:
            sample["gpu"] = gpus
        busy, total = host_cpu()
        if total > prev_host[1]:
            used, mem_total = host_memory()
            share = (busy - prev_host[0]) / (total - prev_host[1]) * 100
            sample["host"] = [round(share, 1), used, mem_total, os.cpu_count() or 1]
        prev_host = (busy, total)
        out.write(json.dumps(sample, separators=(",", ":")) + "\n")
        out.flush()
        count += 1


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
