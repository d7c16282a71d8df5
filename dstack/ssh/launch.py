"""Launching several jobs on a host in one remote command (see dstack.backends.ssh `SSHRunner._launch`).

The command reads the jobs' files as a tar on its stdin (into `<root>/jobs/`), says which objects the
host's cache lacks (and stops there, if any), lays each job's tree out from the cache, starts each job
detached in its own session (as dstack.ssh.process.launch_command does one), waits for their pids, and
prints one line per job. A lone job's launch (`dstack run --host`) may wait a moment for its first output
and bring it back.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, field

FIRST_OUTPUT_WAIT_S = 0.25  # a lone job's launch waits this long for its first output, to bring it back
HEAD_BYTES = 65536  # at most that much of it
LEFTOVERS = ("work", "pid", "exit", ".failed")  # an earlier attempt's, gone before a launch


@dataclass
class Launched:
    """What a launch command said: jobs started, jobs whose tree could not be laid out (why), objects the
    cache lacked, each started job's log size at the end, a lone job's first output."""

    started: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)
    heads: dict[str, bytes] = field(default_factory=dict)


def launch_script(
    root: str, job_ids: list[str], cleanups: list[str], check: bool, first_output: bool = False
) -> str:
    """The command: `cleanups` are job folders whose work trees go first; `check`: the first job's
    `.digests` lists the objects its jobs' `.files` lay out from the cache (else none do); `first_output`:
    wait a moment for a lone job's first output and bring it back."""
    from dstack.ssh import transfer

    ids = " ".join(shlex.quote(j) for j in job_ids)
    objects = shlex.quote(f"{root}/objects")
    lines = [f"J={shlex.quote(f'{root}/jobs')}; O={objects}", 'mkdir -p "$J" "$O" && cd "$J" || exit 1']
    if cleanups:  # each work tree handed back as a spare for its repo's next job, or removed
        from dstack.backends.checkout import recycle_many

        lines.append(recycle_many(cleanups))
    old = " ".join(shlex.quote(f"{j}/{name}") for j in job_ids for name in LEFTOVERS)
    # an earlier attempt's log is kept aside: the first output read below must be this attempt's own
    earlier = f'for j in {ids}; do [ -e "$j/log" ] && mv -f "$j/log" "$j/log.earlier"; done; :'
    lines += [earlier, f"rm -rf -- {old} && mkdir -p -- {ids} && tar -x -f - || exit 1"]
    if check:
        first = shlex.quote(job_ids[0])
        lines += [
            f'm=$(cd "$O" && while read -r d; do [ -e "$d" ] || echo "$d"; done < "$J"/{first}/.digests)',
            f"rm -f {first}/.digests",
            'if [ -n "$m" ]; then for d in $m; do echo "missing $d"; done; exit 0; fi',
        ]
    sh = shlex.quote(transfer._MATERIALIZE_SH)
    batch = shlex.quote(_BATCH_MATERIALIZE_PY.replace("@MATERIALIZE@", repr(transfer._MATERIALIZE_PY)))
    lines += [  # the jobs with files to lay out from the cache
        f'todo=(); for j in {ids}; do [ -s "$j/.files" ] && todo+=("$j"); done',
        "if [ ${#todo[@]} = 0 ]; then :; elif command -v python3 >/dev/null 2>&1; then "
        f'python3 -c {batch} "$O" "${{todo[@]}}"; else',
        f'  for j in "${{todo[@]}}"; do bash --norc -c {sh} _ "$O" "$J/$j" < "$j/.files" > /dev/null'
        ' 2> "$j/.failed" && rm -f "$j/.failed"; done; fi',
        "rm -f -- " + " ".join(shlex.quote(f"{j}/.files") for j in job_ids),
        f'for j in {ids}; do [ -e "$j/.failed" ] && continue; '
        '(cd "$j" && exec setsid nohup bash run.sh > /dev/null 2>&1 < /dev/null) & done',
        f"i=0; while [ $i -lt 2000 ]; do w=; for j in {ids}; do "  # up to 10 s for their pids
        '[ -e "$j/.failed" ] || [ -s "$j/pid" ] || { w=1; break; }; done; '
        '[ -z "$w" ] && break; sleep 0.005; i=$((i+1)); done',
        f'for j in {ids}; do if [ -e "$j/.failed" ]; then '
        "printf 'failed %s %s\\n' \"$j\" \"$(head -c 500 \"$j/.failed\" | tr '\\n' ' ')\"; "
        'rm -f "$j/.failed"; '
        'elif [ -s "$j/pid" ]; then read -r p < "$j/pid"; echo "started $j $p"; fi; done',
    ]
    if first_output and len(job_ids) == 1:
        steps = int(FIRST_OUTPUT_WAIT_S * 200)
        lines += [
            f'j={ids}; i=0; [ -s "$j/pid" ] && while [ $i -lt {steps} ] && [ ! -s "$j/log" ] && '
            '[ ! -e "$j/exit" ]; do sleep 0.005; i=$((i+1)); done',
            'if [ -s "$j/log" ]; then printf \'head %s \' "$j"; '
            f'head -c {HEAD_BYTES} "$j/log" | base64 -w0; echo; fi',
        ]
    logs = " ".join(shlex.quote(f"{j}/log") for j in job_ids)
    lines += [f"stat -c 'size %n %s' -- {logs} 2>/dev/null", "exit 0"]  # how much each has printed
    return "\n".join(lines)


def read_output(output: str) -> Launched:
    """What the launch command's lines say."""
    done = Launched()
    for line in output.splitlines():
        kind, _, rest = line.partition(" ")
        job_id, _, what = rest.partition(" ")
        if kind == "missing":
            done.missing.add(job_id)
        elif kind == "started":
            done.started.add(job_id)
        elif kind == "failed":
            done.failed[job_id] = what
        elif kind == "size" and what.isdigit():
            done.sizes[job_id.rpartition("/")[0]] = int(what)
        elif kind == "head":
            try:
                done.heads[job_id] = base64.b64decode(what, validate=True)
            except ValueError:
                pass  # (no base64 there: read as any log)
    return done


# lays out several jobs from the cache with one python3: dstack.ssh.transfer's script, run per job folder
# (argv: OBJECTS JOB...); a job it fails for gets `.failed` with why
_BATCH_MATERIALIZE_PY = r"""
import io, sys
code = compile(@MATERIALIZE@, "materialize", "exec")
objects = sys.argv[1]
for job in sys.argv[2:]:
    why = None
    try:
        with open(job + "/.files", "rb") as f:
            sys.argv, sys.stdin = ["-c", objects, job], io.TextIOWrapper(f)
            exec(code, {"__name__": "__main__"})
    except SystemExit as e:
        why = None if e.code in (None, 0) else str(e.code)
    except Exception as e:
        why = "%s: %s" % (type(e).__name__, e)
    if why:
        with open(job + "/.failed", "w") as f:
            f.write(why)
"""
