"""`dstack ui`: the local dashboard, through the real CLI and a real browser (Debian's headless `chromium`).

Screenshots of the runs, run and hosts pages are saved under build/screenshots/ (not committed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import copy_example, dstack

SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
PIPELINE = """\
workflows:
  - name: prepare
    commands:
      - mkdir -p data
      - echo "rows=10" > data/set.txt
    artifacts: [data]
  - name: train
    depends-on: [prepare]
    commands:
      - cat data/set.txt
      - python -c 'x = bytearray(40 << 20); import time; time.sleep(1.5)'
      - mkdir -p model && echo weights > model/weights.txt
    artifacts: [model]
"""
TICKER = """\
workflows:
  - name: ticker
    commands:
      - printf '\\033[31mred alert\\033[0m\\n'
      - printf 'progress 10%%\\rprogress 50%%\\rprogress 100%%\\n'
      - for i in $(seq 1 60); do echo "line $i"; sleep 0.25; done
"""


@pytest.fixture(autouse=True)
def fast_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_METRICS_INTERVAL", "0.3")
    monkeypatch.setenv("DSTACK_METRICS_MIRROR_S", "0.2")


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[str]:
    """`dstack ui --no-open` in the background; yields the URL it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack", "ui", "--no-open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dstack ui: http://127.0.0.1:"), line
        yield line.split(": ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def browser(url: str, screenshot: str | None = None, wait_ms: int = 4000) -> str:
    """Load `url` in headless chromium: the DOM after `wait_ms` of page time (and a screenshot if asked)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; scripts/test does)")
    with tempfile.TemporaryDirectory(prefix="dstack-chromium-") as profile:
        flags = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            f"--virtual-time-budget={wait_ms}",
        ]
        if screenshot:
            SHOTS.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [*flags, f"--screenshot={SHOTS / screenshot}", url],
                capture_output=True,
                timeout=90,
                check=True,
            )
        out = subprocess.run(
            [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True
        )
    return out.stdout


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, body


def last_run(repo: Path) -> dict:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]


def test_requests_without_the_token_are_refused(make_repo, ui: str) -> None:
    base, token = ui.split("/?token=")
    assert request(f"{base}/api/runs")[0] == 403
    assert request(f"{base}/api/runs?token=wrong")[0] == 403
    assert request(f"{base}/")[0] == 403
    assert request(f"{base}/api/runs?token={token}") == (200, b"[]")
    # actions: the token in a header, and never from another origin or Host name
    body = json.dumps({"run": "x"}).encode()
    assert request(f"{base}/api/stop?token={token}", body)[0] == 403
    evil = {"X-Dstack-Token": token, "Origin": "http://evil.example"}
    assert request(f"{base}/api/stop", body, evil)[0] == 403
    status, answer = request(f"{base}/api/stop", body, {"X-Dstack-Token": token, "Origin": base})
    assert status == 400 and b"no run named 'x'" in answer
    assert request(f"{base}/api/runs?token={token}", headers={"Host": "evil.example"})[0] == 403
    assert base.startswith("http://127.0.0.1:")


def test_the_example_pipelines_run_its_dag_and_a_metrics_chart_in_the_browser(
    tmp_path: Path, ui: str
) -> None:
    repo = copy_example("digits", tmp_path / "digits")
    dstack("run", "evaluate", "--max_iter", "5", cwd=repo, timeout=120)
    run = last_run(repo)["name"]
    dom = browser(ui, screenshot="runs.png")
    assert run in dom and "status s-done" in dom
    page = browser(f"{ui}#/run/{run}", screenshot="run.png")
    assert 'id="dag"' in page
    assert all(f">{name}</text>" in page for name in ("prepare", "train", "evaluate"))
    assert page.count("marker-end=") == 3  # prepare → train, prepare → evaluate, train → evaluate
    assert 'data-series="mem"' in page and "<polyline" in page  # the selected job's memory chart
    assert "accuracy:" in page  # evaluate's log
    assert "eval/report.json" in page  # its artifacts, with a download link
    hosts = browser(f"{ui}#/hosts", screenshot="hosts.png")
    assert ">local</td>" in hosts


def test_an_artifact_downloads_from_the_run_page_link(make_repo, ui: str) -> None:
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    dstack("run", "train", cwd=repo)
    run = last_run(repo)
    base, token = ui.split("/?token=")
    status, body = request(f"{base}/api/run?name={run['name']}&token={token}")
    job = next(j for j in json.loads(body)["jobs"] if j["workflow"] == "train")
    status, data = request(f"{base}/api/artifact?job={job['id']}&path=model/weights.txt&token={token}")
    assert status == 200 and data == b"weights\n"
    status, _ = request(f"{base}/api/artifact?job={job['id']}&path=../../etc/passwd&token={token}")
    assert status == 404


def test_log_lines_appear_while_a_job_runs_with_colours_and_progress_lines(make_repo, ui: str) -> None:
    repo = make_repo({".dstack/workflows.yaml": TICKER})
    dstack("run", "ticker", "-d", cwd=repo)
    run = last_run(repo)["name"]
    try:
        first = browser(f"{ui}#/run/{run}", wait_ms=2500)
        time.sleep(2)
        second = browser(f"{ui}#/run/{run}", wait_ms=2500)
        count = [sum(f"line {i}\n" in dom for i in range(1, 61)) for dom in (first, second)]
        assert 0 < count[0] < count[1] < 60, count
        assert '<span class="fg-31">red alert</span>' in second
        assert "progress 100%" in second and "progress 10%" not in second  # `\r` redraws the line
        assert "Stop run" in second
        # stop it as the page's button does: POST with the token, from the page's origin
        base, token = ui.split("/?token=")
        status, _ = request(
            f"{base}/api/stop", json.dumps({"run": run}).encode(), {"X-Dstack-Token": token, "Origin": base}
        )
        assert status == 200 and last_run(repo)["status"] == "stopped"
    finally:
        dstack("stop", run, cwd=repo, check=False)


def test_a_tag_added_from_the_page_shows_on_the_tags_page(make_repo, ui: str) -> None:
    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: ['true']\n"})
    dstack("run", "a", cwd=repo)
    run = last_run(repo)["name"]
    base, token = ui.split("/?token=")
    headers = {"X-Dstack-Token": token, "Origin": base}
    status, body = request(f"{base}/api/tag", json.dumps({"run": run, "name": "best"}).encode(), headers)
    assert status == 200 and json.loads(body)["tag"] == "best"
    status, body = request(f"{base}/api/tag", json.dumps({"run": run, "name": "a:b"}).encode(), headers)
    assert status == 400 and b"tag name 'a:b' is not allowed" in body
    dom = browser(f"{ui}#/tags")
    assert '<span class="tag">best</span>' in dom and run in dom
    assert os.environ["DSTACK_HOME"]  # the page read the same state the CLI wrote


def test_a_port_in_use_is_a_one_line_error(ui: str) -> None:
    port = ui.split(":")[2].split("/")[0]
    res = dstack("ui", "--no-open", "--port", port, check=False, timeout=30)
    assert res.code == 2 and f"can't listen on 127.0.0.1:{port}" in res.err and "--port" in res.err
    assert "Traceback" not in res.err


def test_the_token_lives_in_a_cookie_for_this_port_only(ui: str) -> None:
    base, token = ui.split("/?token=")
    with urllib.request.urlopen(ui, timeout=10) as resp:
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    name = cookie.split("=", 1)[0]
    assert name.endswith(base.rsplit(":", 1)[1])
    assert request(f"{base}/api/tags", headers={"Cookie": f"{name}={token}"}) == (200, b"[]")
    assert request(f"{base}/api/tags", headers={"Cookie": f"dstack_ui_token_1={token}"})[0] == 403


def fill_runs(count: int) -> None:
    """`count` finished runs (one job each) written through the state API, as a long-used DSTACK_HOME has."""
    from dstack.store.state import Job, Run, open_state

    now = time.time()
    with open_state() as state:
        for i in range(count):
            run = Run(
                id=f"many{i:05d}",
                name=f"many-run-{i}",
                workflow=("prepare", "train")[i % 2],
                status=("done", "failed")[i % 3 == 0],
                created_at=now - i,
                finished_at=now - i + 1,
            )
            state.insert_run(
                run, [Job(id=f"{run.id}-job", run_id=run.id, workflow=run.workflow, status=run.status)]
            )
        state.add_tag("best", "many00004")


def test_the_runs_page_draws_1000_runs_and_filters_them(ui: str) -> None:
    fill_runs(1000)
    dom = browser(ui)
    assert dom.count('href="#/run/many-run-') == 1000
    painted = int(dom.split('data-first-paint-ms="')[1].split('"')[0])
    assert painted < 3000  # scripts/bench measures it; 200 ms on an idle machine
    shown = browser(f"{ui}#/runs?workflow=train&status=failed")
    names = {n.split('"')[0] for n in shown.split('href="#/run/')[1:]}
    assert names and all(
        int(n.rsplit("-", 1)[1]) % 2 == 1 and int(n.rsplit("-", 1)[1]) % 3 == 0 for n in names
    )
    tagged = browser(f"{ui}#/runs?tag=best")
    assert tagged.count('href="#/run/') == 1 and "many-run-4<" in tagged


def test_without_no_open_it_opens_the_browser_at_the_printed_url(tmp_path: Path) -> None:
    """`webbrowser` runs $BROWSER: here a script that writes down the URL it was given."""
    opened = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    script.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack", "ui"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "BROWSER": f"{script} %s", "DISPLAY": ""},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(": ", 1)[1].strip()
        deadline = time.monotonic() + 15
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened.read_text().strip() == url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
