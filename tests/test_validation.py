"""Bad input is refused at the edge: `validate` reports first everything `run` would refuse, each as one
line with file:line, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MakeRepo
from helpers import Result, dstack

from dstack.errors import ConfigError
from dstack.workflows.yamlfile import parse_yaml

WF = ".dstack/workflows.yaml"


def refused(repo: Path, *args: str, timeout: float = 30) -> Result:
    """`dstack ARGS` fails with exactly one error line and no traceback."""
    res = dstack(*args, cwd=repo, check=False, timeout=timeout)
    assert res.code != 0, res.describe(args)
    assert "Traceback" not in res.output, res.describe(args)
    errors = [line for line in res.err.splitlines() if line.startswith("Error:")]
    assert errors, res.describe(args)
    return res


def both_refuse(repo: Path, workflow: str, expected: str) -> None:
    """`validate` and `run WORKFLOW` both print `expected` (a regex) as an error line."""
    for args in (("validate",), ("run", workflow)):
        res = refused(repo, *args)
        assert re.search(expected, res.err), res.describe(args)
        if args[0] == "run":
            assert len(res.err.strip().splitlines()) == 1, res.describe(args)


# -- 13.2: names ----------------------------------------------------------------------------------

BAD_NAMES = [
    "my flow",
    "naïve",
    "🚀",
    "a;touch x",
    "$(id)",
    "a/b",
    "..",
    "../../etc",
    "-x",
    ".hidden",
    "x" * 65,
]


def test_names_that_cannot_run_are_refused_by_validate_and_run(make_repo: MakeRepo) -> None:
    body = "workflows:\n  - name: ok\n    commands: [echo]\n" + "".join(
        f"  - name: {json.dumps(name, ensure_ascii=False)}\n    commands: [echo hi]\n" for name in BAD_NAMES
    )
    repo = make_repo({WF: body})
    errors = refused(repo, "validate").err.strip().splitlines()
    assert len(errors) == len(BAD_NAMES), errors
    for i, (name, line) in enumerate(zip(BAD_NAMES, errors, strict=True)):
        assert line.startswith(
            f"Error: .dstack/workflows.yaml:{4 + 2 * i}: workflow name {name!r} is not allowed"
        )
        assert "use 1–64 letters, digits, '.', '-' or '_'" in line
    for name in ["my flow", "🚀", "../../etc", "a/b"]:
        res = refused(repo, "run", name)
        assert f"workflow name {name!r} is not allowed" in res.err and "hi" not in res.out
    assert dstack("run", "ok", cwd=repo).code == 0  # the other workflows still run


def test_names_old_repos_use_stay_valid(make_repo: MakeRepo) -> None:
    names = ["train-model", "train_v2", "prepare.data", "A", "1", "v1.2.3", "x" * 64]
    body = "workflows:\n" + "".join(f"  - name: {n}\n    commands: [echo {i}]\n" for i, n in enumerate(names))
    repo = make_repo({WF: body})
    assert "no problems" in dstack("validate", cwd=repo).output
    dstack("run", "prepare.data", cwd=repo)
    jobs = json.loads(
        dstack("jobs", json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"], "--json", cwd=repo).out
    )
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", j["id"]) for j in jobs), jobs


@pytest.mark.parametrize("tag", ["my tag", "..", "ünï", "a;b"])
def test_a_tag_name_goes_through_the_same_rule(make_repo: MakeRepo, tag: str) -> None:
    repo = make_repo({WF: "workflows: []\n", "data/x.txt": "x"})
    res = refused(repo, "tags", "add", tag, "--from", str(repo / "data"))
    assert "tag name" in res.err and "is not allowed" in res.err
    assert json.loads(dstack("tags", "list", "--json", cwd=repo).out) == []


# -- 13.6: YAML alias bomb, unknown tags, merge keys -----------------------------------------------


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nworkflows: [*a8]\n"


def test_a_yaml_alias_bomb_is_refused_at_once(make_repo: MakeRepo) -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 600
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^w\.yaml:5: too many YAML aliases"):
        parse_yaml(bomb, "w.yaml")
    assert time.monotonic() - start < 2
    repo = make_repo({WF: bomb})
    for args in (("validate",), ("run", "x")):
        res = refused(repo, *args, timeout=20)
        assert "workflows.yaml:5: too many YAML aliases" in res.err


def test_anchors_and_merge_keys_of_old_repos_still_read(make_repo: MakeRepo) -> None:
    body = (
        "x-defaults: &defaults\n  commands: [echo shared]\n  resources: {cpu: 1}\n"
        "workflows:\n  - name: a\n    <<: *defaults\n  - name: b\n    <<: [*defaults]\n    commands: [echo own]\n"
    )
    repo = make_repo({WF: body})
    assert "no problems" in dstack("validate", cwd=repo).output
    assert "own" in dstack("run", "b", cwd=repo).out


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!python/object:os.system [x]", "!!python/object:os.system"),
        ("!!python/name:os.system ''", "!!python/name:os.system"),
        ("!custom echo", "!custom"),
        ("!!set {echo: null}", "!!set"),
    ],
)
def test_an_unknown_yaml_tag_is_refused_naming_it(make_repo: MakeRepo, value: str, tag: str) -> None:
    repo = make_repo({WF: f"workflows:\n  - name: a\n    commands: {value}\n"})
    both_refuse(repo, "a", rf"workflows\.yaml:3: unknown YAML tag '{re.escape(tag)}'")


def test_a_merge_key_with_a_non_mapping_is_refused(make_repo: MakeRepo) -> None:
    repo = make_repo({WF: "workflows:\n  - name: a\n    <<: 42\n    commands: [echo]\n"})
    both_refuse(repo, "a", r"workflows\.yaml:3: '<<' merges mappings, not '42'")


def test_yaml_nested_too_deep_is_an_error_not_a_crash(make_repo: MakeRepo) -> None:
    repo = make_repo({WF: "workflows: " + "[" * 100_000 + "]" * 100_000 + "\n"})
    res = refused(repo, "validate")
    assert "workflows.yaml:1: YAML nested more than 200 levels deep" in res.err


# -- 13.7 and 13.13: values run would refuse -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("ports: 100000000", r":3: 'ports: 100000000' asks for more than 100 ports"),
        ("ports: '100000000'", r":3: 'ports: 100000000' asks for more than 100 ports"),
        ("ports: [" + ",".join(str(8000 + i) for i in range(101)) + "]", r":3: 'ports' lists more than 100"),
        ("ports: [0]", r":3: 'ports\[0\]' 0 is not a port number"),
        ("ports: [65536]", r":3: 'ports\[0\]' 65536 is not a port number"),
        ("resources: {cpu: .nan}", r":3: 'resources.cpu' must be a number more than 0, not nan"),
        ("resources: {cpu: .inf}", r":3: 'resources.cpu' must be a number more than 0, not inf"),
        ("resources: {cpu: -2}", r":3: 'resources.cpu' must be a number more than 0"),
        ("retry: {limit: -1}", r":3: 'retry.limit' must be 0 or more, not -1"),
        ("env: {A: '${{ x'}", r":3: unclosed '\$\{\{' in '\$\{\{ x'"),
        ("help: 'use ${{ a }} and ${{ b'", r":3: unclosed '\$\{\{'"),
    ],
    ids=[
        "port-count",
        "port-count-text",
        "101-ports",
        "port-0",
        "port-65536",
        "cpu-nan",
        "cpu-inf",
        "cpu-negative",
        "retry-negative",
        "unclosed-env",
        "unclosed-help",
    ],
)
def test_a_bad_value_is_refused_by_validate_and_run(make_repo: MakeRepo, fields: str, expected: str) -> None:
    repo = make_repo({WF: f"workflows:\n  - name: a\n    {fields}\n    commands: [echo hi]\n"})
    both_refuse(repo, "a", r"^Error: \.dstack/workflows\.yaml" + expected)


def test_an_unclosed_expression_in_commands_is_refused(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {WF: "workflows:\n  - name: a\n    commands:\n      - echo ok\n      - 'echo \"${{ x\"'\n"}
    )
    both_refuse(repo, "a", r"workflows\.yaml:5: unclosed '\$\{\{'")


# -- 13.13: dependencies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "target", "expected"),
    [
        (
            "  - name: a\n    depends-on: [nope]\n    commands: [echo]\n",
            "a",
            r"workflows\.yaml:3: workflow 'a' depends on 'nope', which is not a workflow of this repo",
        ),
        (
            "  - name: a\n    depends-on: [a]\n    commands: [echo]\n",
            "a",
            r":3: workflow 'a' depends on itself",
        ),
        (
            "  - name: a\n    depends-on: [b]\n    commands: [echo]\n"
            "  - name: b\n    depends-on: [c]\n    commands: [echo]\n"
            "  - name: c\n    depends-on: [a]\n    commands: [echo]\n",
            "a",
            r"workflows\.yaml:\d+: workflows depend on each other in a cycle: \w → \w → \w → \w",
        ),
    ],
    ids=["missing", "itself", "cycle"],
)
def test_dependency_errors_are_reported_by_validate(
    make_repo: MakeRepo, body: str, target: str, expected: str
) -> None:
    repo = make_repo({WF: "workflows:\n" + body})
    both_refuse(repo, target, expected)
    assert len(refused(repo, "validate").err.strip().splitlines()) == 1  # a cycle is reported once


def test_a_chain_of_1500_workflows_resolves(make_repo: MakeRepo) -> None:
    n = 1500
    body = "workflows:\n" + "".join(
        f"  - name: w{i}\n    commands: ['true']\n" + (f"    depends-on: [w{i - 1}]\n" if i else "")
        for i in range(n)
    )
    repo = make_repo({WF: body})
    assert f"{n} workflow(s), no problems" in dstack("validate", cwd=repo, timeout=60).output
    dstack("run", f"w{n - 1}", "-d", cwd=repo, timeout=60)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    try:
        jobs = json.loads(dstack("jobs", run, "--json", cwd=repo).out)
        assert [j["name"] for j in jobs] == [f"w{i}" for i in range(n)]
    finally:
        dstack("stop", run, cwd=repo, timeout=60)


# -- 13.13: config files that aren't files ---------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.mkdir()


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.yaml")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_fifo, "is a FIFO, not a regular file"),
        (_folder, "is a directory, not a file"),
        (_dangling, r"is a symlink to '.*nowhere\.yaml', which does not exist"),
    ],
)
@pytest.mark.parametrize("name", ["variables.yaml", "workflows/more.yaml"])
def test_a_config_file_that_is_not_a_file_is_refused(
    make_repo: MakeRepo, make, expected: str, name: str
) -> None:
    repo = make_repo({WF: "workflows:\n  - name: a\n    commands: [echo hi]\n"})
    target = repo / ".dstack" / name
    target.parent.mkdir(exist_ok=True)
    make(target)
    for args in (("validate",), ("run", "a")):
        res = refused(repo, *args, timeout=20)  # a FIFO is never opened for a blocking read
        assert re.search(rf"^Error: \.dstack/{re.escape(name)}: {expected}", res.err, re.M), res.describe(
            args
        )


def test_an_editor_lock_link_next_to_workflow_files_is_ignored(make_repo: MakeRepo) -> None:
    repo = make_repo({".dstack/workflows/a.yaml": "workflows:\n  - name: a\n    commands: [echo hi]\n"})
    (repo / ".dstack" / "workflows" / ".#a.yaml").symlink_to("me@box.4242:1700000000")  # what Emacs leaves
    assert "no problems" in dstack("validate", cwd=repo).output
    assert "hi" in dstack("run", "a", cwd=repo).out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_variables_file_is_refused(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {WF: "workflows:\n  - name: a\n    commands: [echo hi]\n", ".dstack/variables.yaml": "{}"}
    )
    (repo / ".dstack" / "variables.yaml").chmod(0)
    for args in (("validate",), ("run", "a")):
        assert "variables.yaml: can't be read: Permission denied" in refused(repo, *args).err


# -- Also found: library loggers -------------------------------------------------------------------


@contextmanager
def resetting_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts, reads the client's first bytes and resets the connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(256)
                except OSError:
                    pass
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_host_that_resets_the_connection_gives_one_line_and_no_library_traceback(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo({WF: "workflows: []\n"})
    with resetting_server() as port:
        res = refused(repo, "hosts", "add", f"root@127.0.0.1:{port}", "--yes", timeout=60)
    assert "Exception (client)" not in res.err and "paramiko" not in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1, res.err
