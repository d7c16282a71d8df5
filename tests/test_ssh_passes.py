"""The SSH runner within a scheduler pass (real sshd): one poll for all running jobs, the pass's starts and
clean-ups in one remote command, a lone job's first output brought back by its launch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import (  # noqa: F401  (fixtures)
    SSHServer,
    ssh_keys_fixture,
    ssh_pool_fixture,
    sshd_factory_fixture,
    sshd_fixture,
)
from test_hosts import add, make_ctx, wait_exit

from dstack.backends.ssh import SSHRunner
from dstack.hashing import digest_bytes
from dstack.ssh.connection import Connection
from dstack.store.objects import Manifest, ManifestEntry
from dstack.store.state import State

pytestmark = pytest.mark.usefixtures("ssh_pool")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    with State(tmp_path / "state.sqlite") as st:
        yield st


@pytest.fixture
def runner(state: State, sshd: SSHServer, tmp_path: Path) -> SSHRunner:
    return SSHRunner.for_host(add(state, sshd), root=str(tmp_path / "remote"))


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every remote command and SFTP session use, in order (the real ones still run)."""
    seen: list[str] = []
    for method in ("run", "run_with_writer", "run_with_reader"):
        real = getattr(Connection, method)

        def spy(self, command, *args, _real=real, _name=method, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(f"{_name}: {command.splitlines()[0][:60]}")
            return _real(self, command, *args, **kwargs)

        monkeypatch.setattr(Connection, method, spy)
    real_sftp = Connection.sftp

    def sftp(self):  # type: ignore[no-untyped-def]
        seen.append("sftp")
        return real_sftp(self)

    monkeypatch.setattr(Connection, "sftp", sftp)
    return seen


def test_a_pass_starts_its_jobs_in_one_command_and_polls_them_in_one(
    runner: SSHRunner, tmp_path: Path, commands: list[str]
) -> None:
    runner.conn.home  # noqa: B018 - (asked once per connection)
    commands.clear()
    runner.begin_pass([])
    for n in range(3):
        runner.start_job(make_ctx(tmp_path, f"a{n}", [f"echo job {n}"]))
    assert commands == []  # kept for the pass's end
    assert runner.end_pass() == {}
    # the host lacked the repo's objects: it said so, they went over, the jobs' command went again
    assert [c.split(":")[0] for c in commands] == ["run_with_writer"] * 3
    for n in range(3):
        assert wait_exit(runner, f"a{n}").exit_code == 0
        assert runner.read_log(f"a{n}", 0) == f"job {n}\n".encode()

    commands.clear()
    runner.begin_pass(["a0", "a1", "a2"])
    for n in range(3):
        assert runner.poll_job(f"a{n}").exit_code == 0
        assert runner.read_log(f"a{n}", len(f"job {n}\n")) == b""  # not grown since the pass's poll
        runner.cleanup_job(f"a{n}")
        runner.start_job(make_ctx(tmp_path, f"b{n}", [f"echo again {n}"]))
    assert runner.end_pass() == {}
    # one poll, then the clean-ups and the (cached) inputs' starts together
    assert [c.split(":")[0] for c in commands] == ["run", "run_with_writer"]
    assert runner.last_ship is not None and runner.last_ship.objects_sent == 0
    for n in range(3):
        assert wait_exit(runner, f"b{n}").exit_code == 0
        assert runner.read_log(f"b{n}", 0) == f"again {n}\n".encode()
        assert not Path(runner.job_dir(f"a{n}"), "work").exists()
        assert Path(runner.job_dir(f"a{n}"), "log").exists()


def test_a_job_whose_files_cannot_be_laid_out_fails_alone(runner: SSHRunner, tmp_path: Path) -> None:
    good = make_ctx(tmp_path, "good", ["echo fine"])
    bad = make_ctx(tmp_path, "bad", ["echo never"])
    link, inside = digest_bytes(str(tmp_path).encode()), digest_bytes(b"x")
    bad.store.put_bytes(str(tmp_path).encode(), link)  # a link to outside the job, then a file through it
    bad.store.put_bytes(b"x", inside)
    bad.code = Manifest(
        entries=[
            ManifestEntry(path="link", size=len(str(tmp_path)), mode=0o120777, digest=link),
            ManifestEntry(path="link/escaped", size=1, mode=0o100644, digest=inside),
        ]
    )
    runner.begin_pass([])
    runner.start_job(bad)
    runner.start_job(good)
    failed = runner.end_pass()
    assert list(failed) == ["bad"] and "would be written outside" in str(failed["bad"])
    assert not (tmp_path / "escaped").exists()
    assert wait_exit(runner, "good").exit_code == 0


def test_a_start_stopped_before_the_pass_ends_never_runs(runner: SSHRunner, tmp_path: Path) -> None:
    runner.begin_pass([])
    runner.start_job(make_ctx(tmp_path, "gone", ["touch ../ran"]))
    runner.stop_job("gone")
    assert runner.end_pass() == {}
    assert runner.poll_job("gone").status == "lost"


def test_a_lone_job_brings_back_its_first_output(
    runner: SSHRunner, tmp_path: Path, commands: list[str]
) -> None:
    runner.start_job(make_ctx(tmp_path, "first", ["echo first-line", "sleep 30"]))
    commands.clear()
    assert runner.read_log("first", 0) == b"first-line\n"
    assert commands == []  # its launch brought it
    runner.stop_job("first")
    runner.begin_pass([])  # the scheduler's pass on an idle host (`dstack run --host`): the same
    runner.start_job(make_ctx(tmp_path, "second", ["echo second-line", "sleep 30"]))
    assert runner.end_pass() == {}
    commands.clear()
    assert runner.read_log("second", 0) == b"second-line\n" and commands == []
    runner.stop_job("second")


def test_paramiko_loads_invoke_only_for_a_match_exec_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dstack.ssh.connection import import_paramiko\n"
        "import_paramiko()\n"
        "import paramiko\n"
        "assert 'invoke' not in sys.modules\n"
        "config = paramiko.SSHConfig.from_text('Match exec true\\n  User bob\\n')\n"
        "print(config.lookup('box')['user'], 'invoke' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["bob", "True"], out.stderr


def test_a_few_small_files_travel_in_the_launch(
    runner: SSHRunner, tmp_path: Path, commands: list[str]
) -> None:
    from dstack.artifacts import manifest_from_path

    small = tmp_path / "small"
    (small / "project" / "src").mkdir(parents=True)
    (small / "project" / "src" / "main.sh").write_text("echo from main\n")
    (small / "project" / "src" / "main.sh").chmod(0o755)
    ctx = make_ctx(tmp_path, "tiny", ["./src/main.sh", "stat -c %a src/main.sh"])
    ctx.code = manifest_from_path(small, ctx.store)
    runner.conn.home  # noqa: B018
    commands.clear()
    runner.start_job(ctx)
    assert [c.split(":")[0] for c in commands] == ["run_with_writer"]  # no cache asked, nothing laid out
    assert wait_exit(runner, "tiny").exit_code == 0
    assert runner.read_log("tiny", 0) == b"from main\n755\n"
    assert not (Path(runner.root) / "objects" / ctx.code.entries[0].digest).exists()


def test_a_warm_up_that_got_no_answer_is_not_waited_for_twice(tmp_path: Path) -> None:
    import socket
    import time

    from dstack.errors import HostError
    from dstack.ssh import connection
    from dstack.ssh.config import SSHTarget

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = SSHTarget(alias="gone", hostname="127.0.0.1", port=port, user="nobody")
    connection.warm_up(target, "gone")
    assert target.key in connection._WARM_FAILED
    started = time.monotonic()
    with pytest.raises(HostError, match="cannot reach gone"):
        connection.get_connection(target, name="gone")  # the warm-up's answer, not a second try
    assert target.key not in connection._WARM_FAILED
    with pytest.raises(HostError, match="cannot reach gone"):
        connection.get_connection(target, name="gone")  # tries again itself
    assert time.monotonic() - started < 5
