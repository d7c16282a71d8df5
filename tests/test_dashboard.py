"""`dstack ui`: the local dashboard, through the real CLI and a real browser (Debian's headless `chromium`
driven by Playwright). Screenshots of the runs, run and hosts pages are saved under build/screenshots/
(not committed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import CHROMIUM_ARGS, copy_example, dstack

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
WAIT_MS = 30_000  # the longest any page wait may take
DONE = "#3fb950"  # app.js COLORS.done
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
# a coloured line, a `\r` progress bar redrawn over ~6 s, then a line every 0.25 s
TICKER = """\
workflows:
  - name: ticker
    commands:
      - printf '\\033[31mred alert\\033[0m\\n'
      - for i in $(seq 1 20); do printf '\\rprogress %d/20' $i; sleep 0.3; done; echo
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


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright (never `playwright install`: no browser download)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; scripts/test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page in its own context (no cookies from other tests), every wait bounded."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def log_text(page: Page) -> str:
    return page.locator("#log").inner_text()


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


def test_the_browser_is_refused_without_the_token_and_let_in_with_it(ui: str, page: Page) -> None:
    base, _ = ui.split("/?token=")
    for url in (f"{base}/", f"{base}/?token=wrong", f"{base}/api/runs"):
        response = page.goto(url)
        assert response is not None and response.status in (401, 403), url
        assert "dstack ui" in page.content()  # says which URL to open
    response = page.goto(ui)
    assert response is not None and response.status == 200
    page.wait_for_selector("#runs tbody tr")
    assert "token=" not in page.url  # the cookie holds it now
    again = page.context.new_page()  # the same browser, without the token in the URL
    response = again.goto(f"{base}/#/tags")
    assert response is not None and response.status == 200
    again.wait_for_selector("#tags tbody tr")


def test_the_example_pipelines_run_its_dag_and_a_metrics_chart_in_the_browser(
    tmp_path: Path, ui: str, page: Page
) -> None:
    from playwright.sync_api import expect

    repo = copy_example("digits", tmp_path / "digits")
    dstack("run", "evaluate", "--max_iter", "5", cwd=repo, timeout=120)
    run = last_run(repo)["name"]
    page.goto(ui)  # the URL `dstack ui` printed
    link = page.locator("#runs a", has_text=run)
    expect(link).to_be_visible(timeout=WAIT_MS)
    row = page.locator("#runs tbody tr", has=page.locator("a", has_text=run))
    expect(row.locator(".status")).to_have_text("done")
    shot(page, "runs.png")

    link.click()
    expect(page.locator("#run-status")).to_have_text("done", timeout=WAIT_MS)
    nodes = page.locator("#dag .node")
    expect(nodes).to_have_count(3, timeout=WAIT_MS)
    assert sorted(nodes.locator("text").nth(i).text_content() or "" for i in range(0, 6, 2)) == [
        "evaluate",
        "prepare",
        "train",
    ]
    for i in range(3):  # each box is drawn in its status's colour
        node = nodes.nth(i)
        assert (node.locator("text").nth(1).text_content() or "").startswith("done")
        assert node.locator("rect").get_attribute("stroke") == DONE
    assert (
        page.locator("#dag path[marker-end]").count() == 3
    )  # prepare→train, prepare→evaluate, train→evaluate
    # the selected job's memory chart: an svg line through its samples
    line = page.locator('.chart[data-series="mem"] svg polyline')
    expect(line).to_be_visible(timeout=WAIT_MS)
    points = (line.get_attribute("points") or "").split()
    assert len(points) >= 2, points
    box = line.bounding_box()
    assert box is not None and box["width"] > 100
    expect(page.locator("#log")).to_contain_text("accuracy:", timeout=WAIT_MS)  # evaluate's log
    expect(page.locator("#artifacts a[download]", has_text="eval/report.json")).to_be_visible()
    shot(page, "run.png")

    page.click("#nav-hosts")
    expect(page.locator("#hosts tbody td:first-child", has_text=re.compile("^local$"))).to_be_visible(
        timeout=WAIT_MS
    )
    shot(page, "hosts.png")


def test_an_artifact_downloads_from_the_run_page_link(make_repo, ui: str, page: Page) -> None:
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    dstack("run", "train", cwd=repo)
    run = last_run(repo)
    page.goto(f"{ui}#/run/{run['name']}")
    link = page.locator("#artifacts a[download]", has_text="model/weights.txt")
    link.wait_for(timeout=WAIT_MS)
    with page.expect_download(timeout=WAIT_MS) as info:
        link.click()
    path = info.value.path()
    assert Path(path).read_bytes() == b"weights\n"
    base, token = ui.split("/?token=")
    status, body = request(f"{base}/api/run?name={run['name']}&token={token}")
    job = next(j for j in json.loads(body)["jobs"] if j["workflow"] == "train")
    status, _ = request(f"{base}/api/artifact?job={job['id']}&path=../../etc/passwd&token={token}")
    assert status == 404


def test_log_lines_appear_while_a_job_runs_with_colours_and_progress_lines(
    make_repo, ui: str, page: Page
) -> None:
    repo = make_repo({".dstack/workflows.yaml": TICKER})
    dstack("run", "ticker", "-d", cwd=repo)
    run = last_run(repo)["name"]
    try:
        page.goto(f"{ui}#/run/{run}")
        page.evaluate("window.sameDocument = true")  # gone if anything reloads the page
        # the progress bar, while it is being drawn: one line, redrawn in place
        page.wait_for_function(
            "() => /progress ([1-9]|1[0-9])\\/20/.test(document.getElementById('log').textContent)",
            timeout=WAIT_MS,
        )
        seen = log_text(page)
        assert seen.count("progress") == 1, seen
        page.wait_for_function(
            "() => document.getElementById('log').textContent.includes('line 3\\n')", timeout=WAIT_MS
        )
        early = log_text(page)
        assert early.count("progress") == 1 and "progress 20/20" in early, early
        page.wait_for_function(
            "() => document.getElementById('log').textContent.includes('line 12\\n')", timeout=WAIT_MS
        )
        later = log_text(page)
        assert page.evaluate("window.sameDocument") is True  # it came in live, without a reload
        assert "line 1\n" in later and "line 60\n" not in later  # and while the job was still running
        red = page.locator("#log span.fg-31")
        assert red.first.text_content() == "red alert"  # ANSI colours
        # stop it with the page's button (it asks first)
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#stop")
        page.wait_for_function(
            "() => document.getElementById('msg').textContent.startsWith('stopped:')", timeout=WAIT_MS
        )
        assert last_run(repo)["status"] == "stopped"
    finally:
        dstack("stop", run, cwd=repo, check=False)


def test_a_tag_added_from_the_page_shows_on_the_tags_page(make_repo, ui: str, page: Page) -> None:
    from playwright.sync_api import expect

    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: ['true']\n"})
    dstack("run", "a", cwd=repo)
    run = last_run(repo)["name"]
    page.goto(f"{ui}#/run/{run}")
    expect(page.locator("#run-status")).to_have_text("done", timeout=WAIT_MS)
    page.fill("#tag-name", "a:b")
    page.click("#tag")
    expect(page.locator("#msg")).to_contain_text("tag name 'a:b' is not allowed", timeout=WAIT_MS)
    page.fill("#tag-name", "best")
    page.click("#tag")
    expect(page.locator("#msg")).to_have_text("tagged best", timeout=WAIT_MS)
    page.click("#nav-tags")
    row = page.locator("#tags tr", has=page.locator("span.tag", has_text="best"))
    expect(row.locator("a")).to_have_text(run, timeout=WAIT_MS)
    assert [t["name"] for t in json.loads(dstack("tags", "list", "--json", cwd=repo).out)] == ["best"]
    assert os.environ["DSTACK_HOME"]  # the page wrote the same state the CLI reads


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


def shown_runs(page: Page) -> list[str]:
    return page.eval_on_selector_all("#runs tbody a", "links => links.map(a => a.textContent)")


def test_the_runs_page_draws_1000_runs_and_filters_them(ui: str, page: Page) -> None:
    fill_runs(1000)
    page.goto(ui)
    page.wait_for_function(
        "() => document.querySelectorAll('#runs tbody a').length === 1000", timeout=WAIT_MS
    )
    page.wait_for_function("() => document.body.dataset.firstPaintMs", timeout=WAIT_MS)
    paints = page.evaluate(
        "Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, Math.round(e.startTime)]))"
    )
    table = int(page.evaluate("document.body.dataset.firstPaintMs"))
    print(
        f"\nruns page, 1,000 runs: first-paint {paints.get('first-paint')} ms,"
        f" first-contentful-paint {paints.get('first-contentful-paint')} ms, table drawn {table} ms"
    )
    assert 0 < paints["first-contentful-paint"] < 3000  # scripts/bench measures it; 200 ms on an idle machine
    assert table < 3000
    # filters: the page's own selects
    page.select_option("#f-workflow", "train")
    page.select_option("#f-status", "failed")
    page.wait_for_function("() => document.querySelectorAll('#runs tbody a').length < 1000", timeout=WAIT_MS)
    names = shown_runs(page)
    assert names and all(int(n.rsplit("-", 1)[1]) % 6 == 3 for n in names), names[:5]
    assert len(names) == len([i for i in range(1000) if i % 6 == 3])
    assert "workflow=train" in page.url and "status=failed" in page.url  # the filters as a link
    page.select_option("#f-workflow", "")
    page.select_option("#f-status", "")
    page.select_option("#f-tag", "best")
    page.wait_for_function("() => document.querySelectorAll('#runs tbody a').length === 1", timeout=WAIT_MS)
    assert shown_runs(page) == ["many-run-4"]
    page.goto(f"{ui.split('/?token=')[0]}/#/runs?workflow=prepare&status=done")  # and the link, opened again
    page.wait_for_function("() => document.querySelectorAll('#runs tbody a').length > 0", timeout=WAIT_MS)
    assert all(int(n.rsplit("-", 1)[1]) % 2 == 0 and int(n.rsplit("-", 1)[1]) % 3 for n in shown_runs(page))


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
