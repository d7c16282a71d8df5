// dstack's dashboard: a small single-page app over /api/* (same origin, token cookie). No dependencies.
"use strict";
const TOKEN = document.querySelector('meta[name="dstack-token"]').content;
const main = document.getElementById("main");
const ACTIVE = ["pending", "running", "stopping", "starting", "waiting"];
const COLORS = { done: "#3fb950", failed: "#f85149", stopped: "#f85149", running: "#d29922", starting: "#d29922",
  pending: "#8b93a7", waiting: "#bc8cff", cancelled: "#5b6273", reused: "#39c5cf" };
let page = { refresh: null }, timer = null;
const filters = { workflow: "", tag: "", status: "" };

function esc(s) { return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
async function api(path) {
  const r = await fetch(path, { credentials: "include" });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
  return r.json();
}
async function post(path, body) {
  const r = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Dstack-Token": TOKEN }, body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function ago(t) {
  if (!t) return "";
  const d = Date.now() / 1000 - t;
  if (d < 60) return Math.floor(d) + "s ago";
  if (d < 3600) return Math.floor(d / 60) + "m ago";
  if (d < 86400) return Math.floor(d / 3600) + "h ago";
  return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ");
}
function dur(a, b) {
  if (!a) return "";
  const d = (b || Date.now() / 1000) - a;
  return d < 60 ? d.toFixed(1) + "s" : Math.floor(d / 60) + "m" + String(Math.floor(d % 60)).padStart(2, "0") + "s";
}
function bytes(n) {
  let v = Number(n) || 0;
  for (const u of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(v) < 1024 || u === "TiB") return (u === "B" ? v.toFixed(0) : v.toFixed(1)) + " " + u;
    v /= 1024;
  }
}
function fmt(v, unit) {
  if (unit === "bytes") return bytes(v);
  if (unit === "bytes/s") return bytes(v) + "/s";
  return (Math.round(v * 10) / 10).toString() + (unit === "%" ? "%" : "");
}
const status = s => `<span class="status s-${esc(s)}">${esc(s)}</span>`;

// -- runs ---------------------------------------------------------------------------------------------
function runsPage() {
  main.innerHTML = `<h1>Runs</h1><div class="filters">
    <select id="f-workflow"><option value="">all workflows</option></select>
    <select id="f-tag"><option value="">any tag</option></select>
    <select id="f-status"><option value="">any status</option></select></div>
    <table id="runs"><thead><tr><th>Run</th><th>Workflow</th><th>Status</th><th>Tags</th><th>Branch</th><th>Commit</th><th>Started</th><th>Duration</th><th>Reason</th></tr></thead><tbody></tbody></table>`;
  for (const k of ["workflow", "tag", "status"]) {
    const el = document.getElementById("f-" + k);
    el.onchange = () => {
      filters[k] = el.value;
      const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v)).toString();
      history.replaceState(null, "", "#/runs" + (q ? "?" + q : ""));
      render();
    };
  }
  let runs = [];
  function options(id, values, cur) {
    const el = document.getElementById(id);
    const first = el.options[0].outerHTML;
    el.innerHTML = first + [...new Set(values)].sort().map(v => `<option${v === cur ? " selected" : ""}>${esc(v)}</option>`).join("");
  }
  function render() {
    const shown = runs.filter(r => (!filters.workflow || r.workflow === filters.workflow) &&
      (!filters.tag || r.tags.includes(filters.tag)) && (!filters.status || r.status === filters.status));
    document.querySelector("#runs tbody").innerHTML = shown.map(r => `<tr>
      <td><a href="#/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a></td><td>${esc(r.workflow)}</td><td>${status(r.status)}</td>
      <td>${r.tags.map(t => `<span class="tag">${esc(t)}</span>`).join("")}</td><td>${esc(r.branch)}</td><td class="dim">${esc(r.commit)}</td>
      <td>${ago(r.created_at)}</td><td>${dur(r.created_at, r.finished_at)}</td><td class="dim">${esc(r.reason)}</td></tr>`).join("") ||
      `<tr><td colspan="9" class="dim">No runs${runs.length ? " match these filters" : " yet: start one with <code>dstack run WORKFLOW</code>"}.</td></tr>`;
  }
  page.refresh = async () => {
    runs = await api("/api/runs");
    options("f-workflow", runs.map(r => r.workflow), filters.workflow);
    options("f-tag", runs.flatMap(r => r.tags), filters.tag);
    options("f-status", runs.map(r => r.status), filters.status);
    render();
    // when the first table was drawn, in ms from navigation start (scripts/bench reads it)
    if (!document.body.dataset.firstPaintMs) requestAnimationFrame(() => (document.body.dataset.firstPaintMs = Math.round(performance.now())));
  };
}

// -- one run ------------------------------------------------------------------------------------------
function dagSvg(jobs, selected) {
  const byId = Object.fromEntries(jobs.map(j => [j.id, j]));
  const depth = {};
  const d = j => depth[j.id] ?? (depth[j.id] = 1 + Math.max(-1, ...j.upstream.filter(u => byId[u]).map(u => d(byId[u]))));
  jobs.forEach(d);
  const cols = {};
  jobs.forEach(j => (cols[depth[j.id]] = cols[depth[j.id]] || []).push(j));
  const W = 140, H = 44, GX = 46, GY = 26, pos = {};
  let maxRows = 1;
  for (const [c, list] of Object.entries(cols)) {
    maxRows = Math.max(maxRows, list.length);
    list.forEach((j, i) => (pos[j.id] = { x: 10 + c * (W + GX), y: 30 + i * (H + GY) }));
  }
  const width = 20 + Object.keys(cols).length * (W + GX) - GX, height = 40 + maxRows * (H + GY) - GY;
  let edges = "", nodes = "";
  for (const j of jobs) for (const u of j.upstream) if (pos[u]) {
    const a = pos[u], b = pos[j.id], x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    if (b.x - a.x > W + GX) {  // skips a column: arc over the boxes between, from top to top
      const top = Math.min(a.y, b.y) - 14;
      edges += `<path d="M${a.x + W / 2},${a.y} C${a.x + W / 2},${top} ${b.x + W / 2},${top} ${b.x + W / 2 - 1},${b.y}" marker-end="url(#arrow)"/>`;
    } else {
      edges += `<path d="M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}" marker-end="url(#arrow)"/>`;
    }
  }
  for (const j of jobs) {
    const p = pos[j.id], c = COLORS[j.status] || "#8b93a7";
    nodes += `<g class="node${j.id === selected ? " sel" : ""}" data-job="${esc(j.id)}"><rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" fill="${c}33" stroke="${c}"/>
      <text x="${p.x + 12}" y="${p.y + 18}">${esc(j.workflow)}</text><text x="${p.x + 12}" y="${p.y + 35}" style="fill:${c};font-size:11px">${esc(j.status)}${j.runner ? " · " + esc(j.runner) : ""}</text></g>`;
  }
  return `<svg class="dag" id="dag" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" style="max-width:100%;height:auto">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" style="fill:#8b93a7;stroke:none"/></marker></defs>${edges}${nodes}</svg>`;
}

// ANSI SGR colours to spans; `\r` without `\n` starts the line again (progress bars update in place)
function Terminal(el) {
  let done = "", cur = "", style = [];
  function html(text) {
    let out = "", open = false;
    const parts = text.split(/\x1b\[([0-9;]*)([A-Za-z])/);
    for (let i = 0; i < parts.length; i += 3) {
      if (parts[i]) out += (style.length ? `<span class="${style.join(" ")}">` : "") + esc(parts[i]) + (style.length ? "</span>" : "");
      if (i + 2 < parts.length && parts[i + 2] === "m") {
        for (const code of (parts[i + 1] || "0").split(";").map(Number)) {
          if (code === 0) style = [];
          else if (code === 1 || code === 3 || code === 4) style.push("ansi-" + code);
          else if ((code >= 30 && code <= 37) || (code >= 90 && code <= 97)) style = style.filter(s => !s.startsWith("fg-")).concat("fg-" + code);
          else if (code >= 40 && code <= 47) style = style.filter(s => !s.startsWith("bg-")).concat("bg-" + code);
          else if (code === 39) style = style.filter(s => !s.startsWith("fg-"));
        }
      }
    }
    return out;
  }
  return {
    write(text) {
      for (const piece of text.split(/(\r\n|\n|\r)/)) {
        if (piece === "\n" || piece === "\r\n") { done += html(cur) + "\n"; cur = ""; }
        else if (piece === "\r") cur = "";
        else cur += piece;
      }
      const saved = style.slice();
      const stick = el.scrollTop + el.clientHeight >= el.scrollHeight - 20;
      el.innerHTML = done + html(cur);
      style = saved;
      if (stick) el.scrollTop = el.scrollHeight;
    },
  };
}

function chart(s, live) {
  const pts = s.points, n = pts.length;
  if (!n) return "";
  const hi = Math.max(...pts, s.unit === "%" ? 100 : 0, 1e-9), W = 300, H = 90;
  const xy = pts.map((v, i) => `${(n === 1 ? W : (i / (n - 1)) * W).toFixed(1)},${(H - 4 - (v / hi) * (H - 8)).toFixed(1)}`);
  if (n === 1) xy.unshift(`0,${xy[0].split(",")[1]}`);
  return `<div class="chart" data-series="${esc(s.name)}"><div class="title"><b>${esc(s.label)}</b><span>${live ? "now" : "last"} ${fmt(s.current, s.unit)} · peak ${fmt(s.peak, s.unit)} · mean ${fmt(s.mean, s.unit)}</span></div>
    <svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none"><polygon points="0,${H} ${xy.join(" ")} ${W},${H}"/><polyline points="${xy.join(" ")}"/></svg></div>`;
}

function lineageHtml(nodes) {
  if (!nodes || !nodes.length) return "";
  return "<ul>" + nodes.map(n => `<li><b>${esc(n.workflow)}</b> <span class="dim">${esc(n.run)} · ${esc((n.commit || "").slice(0, 8))} · ${esc(n.diff_summary)}</span>
    ${n.tags.map(t => `<span class="tag">${esc(t)}</span>`).join("")}${lineageHtml(n.upstream)}</li>`).join("") + "</ul>";
}

function runPage(name) {
  let selected = null, term = null, offset = 0, logJob = null;
  main.innerHTML = `<h1>Run <span id="run-name">${esc(name)}</span> <span id="run-status"></span></h1>
    <div id="run-actions" class="filters"></div><div class="grid">
    <div><div class="panel" id="dag-panel"></div><h2>Details</h2><div class="panel" id="details"></div><h2>Lineage</h2><div class="panel" id="lineage"></div></div>
    <div><h2 style="margin-top:0">Log <span id="log-job" class="dim"></span></h2><pre class="log" id="log"></pre>
    <h2>Metrics</h2><div id="metrics" class="charts"></div><h2>Artifacts</h2><div class="panel" id="artifacts"></div></div></div>`;
  const actions = document.getElementById("run-actions");
  actions.innerHTML = `<button class="danger" id="stop">Stop run</button><input id="tag-name" placeholder="tag name"><button id="tag">Add tag</button><span id="msg" class="dim"></span>`;
  const msg = t => (document.getElementById("msg").textContent = t);
  document.getElementById("stop").onclick = async () => {
    if (!confirm(`Stop run ${name}?`)) return;
    try { msg("stopped: " + (await post("/api/stop", { run: name })).status); } catch (e) { msg(e.message); }
    page.refresh();
  };
  document.getElementById("tag").onclick = async () => {
    try { msg("tagged " + (await post("/api/tag", { run: name, name: document.getElementById("tag-name").value })).tag); } catch (e) { msg(e.message); }
    page.refresh();
  };
  async function pullLog() {
    if (!selected) return;
    if (logJob !== selected) { logJob = selected; offset = 0; document.getElementById("log").textContent = ""; term = Terminal(document.getElementById("log")); }
    for (let i = 0; i < 8; i++) {
      const r = await fetch(`/api/log?job=${encodeURIComponent(selected)}&offset=${offset}`, { credentials: "same-origin" });
      if (!r.ok) return;
      const next = Number(r.headers.get("X-Log-Offset"));
      const text = await r.text();
      if (next === offset) return;
      offset = next;
      term.write(text);
    }
  }
  page.refresh = async () => {
    const [run, metrics] = await Promise.all([api("/api/run?name=" + encodeURIComponent(name)),
      api("/api/metrics?run=" + encodeURIComponent(name))]);
    document.getElementById("run-status").innerHTML = status(run.status);
    document.getElementById("stop").style.display = ACTIVE.includes(run.status) ? "" : "none";
    if (!selected || !run.jobs.some(j => j.id === selected)) {
      selected = (run.jobs.find(j => j.status === "running") || run.jobs[run.jobs.length - 1] || {}).id;
    }
    document.getElementById("dag-panel").innerHTML = dagSvg(run.jobs, selected);
    document.querySelectorAll("#dag .node").forEach(g => (g.onclick = () => { selected = g.dataset.job; page.refresh(); }));
    const job = run.jobs.find(j => j.id === selected) || {};
    document.getElementById("log-job").textContent = job.workflow ? `· ${job.workflow}` : "";
    const vars = Object.entries(run.variables).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("");
    document.getElementById("details").innerHTML = `<table class="kv"><tr><td>workflow</td><td>${esc(run.workflow)}</td></tr>
      <tr><td>branch · commit</td><td>${esc(run.branch)} · ${esc((run.commit || "").slice(0, 10))}</td></tr>
      <tr><td>started</td><td>${ago(run.created_at)} (${dur(run.created_at, run.finished_at)})</td></tr>
      <tr><td>tags</td><td>${run.tags.map(t => `<span class="tag">${esc(t)}</span>`).join("") || "-"}</td></tr>
      ${run.reason ? `<tr><td>reason</td><td class="err">${esc(run.reason)}</td></tr>` : ""}
      ${job.reason ? `<tr><td>${esc(job.workflow)}</td><td class="err">${esc(job.reason)}</td></tr>` : ""}
      </table><h2>Variables</h2><table class="kv">${vars || '<tr><td colspan="2" class="dim">none</td></tr>'}</table>`;
    document.getElementById("lineage").innerHTML = lineageHtml(run.lineage) || '<span class="dim">no lineage</span>';
    const files = run.artifacts[selected] || [];
    document.getElementById("artifacts").innerHTML = files.length ? `<table><tr><th>File</th><th>Size</th></tr>${files.map(f =>
      `<tr><td><a href="/api/artifact?job=${encodeURIComponent(selected)}&path=${encodeURIComponent(f.path)}" download>${esc(f.path)}</a></td><td>${bytes(f.size)}</td></tr>`).join("")}</table>`
      : '<span class="dim">no artifacts saved (yet)</span>';
    const m = metrics.find(x => x.job_id === selected);
    document.getElementById("metrics").innerHTML = m && m.samples ? Object.entries(m.series).map(([k, s]) => chart({ ...s, name: k }, job.status === "running")).join("")
      : '<span class="dim">no samples for this job yet</span>';
    await pullLog();
  };
}

// -- hosts and tags -----------------------------------------------------------------------------------
function barPct(v) { return v == null ? "-" : `<span class="bar"><i style="width:${Math.min(100, v).toFixed(0)}%"></i></span>${v.toFixed(0)}%`; }
function hostsPage() {
  main.innerHTML = `<h1>Hosts</h1><table id="hosts"><thead><tr><th>Name</th><th>Kind</th><th>Status</th><th>Address</th><th>CPUs</th><th>Memory</th><th>GPUs</th><th>CPU use</th><th>Memory use</th><th>GPU use</th><th>Jobs</th></tr></thead><tbody></tbody></table>`;
  page.refresh = async () => {
    const hosts = await api("/api/hosts");
    document.querySelector("#hosts tbody").innerHTML = hosts.map(h => {
      const u = h.usage || {};
      const mem = u.memory_total ? barPct((u.memory_used / u.memory_total) * 100) + ` <span class="dim">${bytes(u.memory_used)}</span>` : "-";
      return `<tr><td>${esc(h.name)}</td><td>${esc(h.kind)}</td><td>${status(h.status)}</td><td>${esc(h.address)}</td><td>${h.cpus ?? ""}</td>
        <td>${h.memory_mib ? bytes(h.memory_mib * 1048576) : ""}</td><td>${esc(h.gpus.join(", "))}</td><td>${barPct(u.cpu_percent)}</td><td>${mem}</td>
        <td>${barPct(u.gpu_util)}</td><td>${esc(h.jobs.join(", ") || h.last_error || "")}</td></tr>`;
    }).join("") || '<tr><td colspan="11" class="dim">No hosts registered: add one with <code>dstack hosts add</code>.</td></tr>';
  };
}
function tagsPage() {
  main.innerHTML = `<h1>Tags</h1><table id="tags"><thead><tr><th>Tag</th><th>Run</th><th>Workflows</th><th>Created</th></tr></thead><tbody></tbody></table>`;
  page.refresh = async () => {
    const tags = await api("/api/tags");
    document.querySelector("#tags tbody").innerHTML = tags.map(t => `<tr><td><span class="tag">${esc(t.name)}</span></td>
      <td><a href="#/run/${encodeURIComponent(t.run)}">${esc(t.run)}</a></td><td>${esc(t.workflows.join(", "))}</td><td>${ago(t.created_at)}</td></tr>`).join("") ||
      '<tr><td colspan="4" class="dim">No tags: add one on a run\'s page or with <code>dstack tags add</code>.</td></tr>';
  };
}

// -- routing and live refresh -------------------------------------------------------------------------
async function tick() {
  clearTimeout(timer);
  const live = document.getElementById("live");
  try { if (page.refresh) await page.refresh(); live.textContent = "live"; }
  catch (e) { live.textContent = "error: " + e.message; }
  timer = setTimeout(tick, 1500);
}
function route() {
  const [path, query] = (location.hash || "#/runs").split("?");
  const [, what, arg] = path.split("/");
  if (what === "runs") {  // #/runs?workflow=train&tag=best&status=done: filters as a link
    const params = new URLSearchParams(query || "");
    for (const k of Object.keys(filters)) filters[k] = params.get(k) || "";
  }
  for (const k of ["runs", "hosts", "tags"]) document.getElementById("nav-" + k).className = (what === k || (k === "runs" && what === "run")) ? "on" : "";
  page = { refresh: null };
  if (what === "run" && arg) runPage(decodeURIComponent(arg));
  else if (what === "hosts") hostsPage();
  else if (what === "tags") tagsPage();
  else runsPage();
  tick();
}
window.addEventListener("hashchange", route);
if (location.search.includes("token=")) history.replaceState(null, "", "/" + location.hash);  // the cookie holds it now
route();
