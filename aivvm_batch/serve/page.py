"""``GET /``: the batches a key owns, with progress, counts by status, frequent errors, downloads,
and a line on the workers (how many work, how many are missing, what they say; not their names,
which name the hosts).

The page is static; its script reads the key from the address's fragment
(``/#key=...``, never sent to the server) or asks for it, keeps it in the tab's
session storage, and polls ``/ui/batches`` while a batch runs. Every text is set
with ``textContent``: a provider's error message cannot inject markup.
"""

from __future__ import annotations

from typing import Any

from jobs.heartbeats import WorkerSeen
from jobs.records import BatchInfo, Status

TOP_ERRORS = 5
REFRESH_MS = 1000
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def row(batch: dict[str, Any], info: BatchInfo | None) -> dict[str, Any]:
    """What the page shows of one batch: the Batch object, counts by status and the top errors."""
    counts = {s.value: (info.counts.get(s.value, 0) if info else 0) for s in Status}
    totals = batch["request_counts"]
    done = info.done if info else totals["completed"] + totals["failed"]
    errors = sorted((info.errors if info else {}).items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]
    return {"batch": batch, "counts": counts if info else None, "done": done, "total": totals["total"],
            "errors": [{"text": text, "count": count} for text, count in errors]}


def workers(seen: list[WorkerSeen]) -> dict[str, Any]:
    """What the page says of the workers: how many were seen lately, the items they hold, how many
    are missing, and their notes (``provider unreachable for 60 s``)."""
    live = [w for w in seen if not w.missing]
    return {"live": len(live), "holding": sum(w.held for w in live), "missing": len(seen) - len(live),
            "notes": sorted({w.note for w in live if w.note})}


HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aivvm-batch</title>
<link rel="stylesheet" href="/ui/page.css">
<script src="/ui/page.js" defer></script>
</head>
<body>
<header><h1>aivvm-batch</h1><span id="state">loading…</span></header>
<p id="workers" hidden></p>
<form id="login" hidden>
  <label>API key <input id="key" type="password" autocomplete="off"></label>
  <button type="submit">Show my batches</button>
</form>
<p id="empty" hidden>No batches yet. Create one with the OpenAI SDK: <code>client.batches.create(...)</code>.</p>
<table id="batches" hidden>
  <thead><tr><th>batch</th><th>status</th><th>progress</th><th>by status</th><th>most frequent errors of attempts</th>
  <th>files</th></tr></thead>
  <tbody></tbody>
</table>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2733; background: #f7f8fa; }
header { display: flex; align-items: baseline; gap: 1rem; }
h1 { font-size: 1.4rem; margin: 0 0 1rem; }
#state { color: #667; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .5rem .6rem; border-bottom: 1px solid #dde2e8; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
.bar { width: 14rem; height: .9rem; background: #e3e7ec; border-radius: .45rem; overflow: hidden; }
.fill { height: 100%; background: #2f7de1; }
.fill.completed { background: #2e9d5b; }
.fill.failed, .fill.expired, .fill.cancelled { background: #c8513f; }
.status { font-weight: 600; }
.counts span { display: inline-block; margin-right: .6rem; }
ul { margin: 0; padding-left: 1.1rem; }
.id { font-family: ui-monospace, monospace; font-size: 12px; }
a { color: #1f5fb8; margin-right: .6rem; }
"""

SCRIPT = r"""
"use strict";
const STORAGE = "aivvm-batch-key";
const REFRESH_MS = %(refresh)d;
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
let timer = null;

function key() { return sessionStorage.getItem(STORAGE) || ""; }

function takeKeyFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("key")) {
    sessionStorage.setItem(STORAGE, params.get("key"));
    history.replaceState(null, "", location.pathname);
  }
}

function headers() { return key() ? {Authorization: "Bearer " + key()} : {}; }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function download(fileId, name) {
  const link = el("a", name);
  link.href = "/v1/files/" + encodeURIComponent(fileId) + "/content";
  link.dataset.file = fileId;
  link.addEventListener("click", async (event) => {
    if (!key()) return;
    event.preventDefault();
    const reply = await fetch(link.href, {headers: headers()});
    if (!reply.ok) { setState("download failed: " + reply.status); return; }
    const url = URL.createObjectURL(await reply.blob());
    const save = el("a");
    save.href = url; save.download = fileId + ".jsonl";
    document.body.appendChild(save); save.click(); save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
  return link;
}

function setState(text) { document.getElementById("state").textContent = text; }

function render(rows) {
  const table = document.getElementById("batches");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const row of rows) {
    const b = row.batch;
    const tr = el("tr");
    tr.id = "batch-" + b.id;
    tr.dataset.status = b.status;
    const idCell = el("td");
    idCell.append(el("div", b.id, "id"), el("div", new Date(b.created_at * 1000).toLocaleString()));
    tr.append(idCell);
    tr.append(el("td", b.status, "status"));
    const progress = el("td");
    const total = row.total || 0, done = row.done || 0;
    const percent = total ? Math.round(100 * done / total) : (TERMINAL.has(b.status) ? 100 : 0);
    const bar = el("div", null, "bar");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(total));
    bar.setAttribute("aria-valuenow", String(done));
    const fill = el("div", null, "fill " + b.status);
    fill.style.width = percent + "%%";
    bar.append(fill);
    progress.append(bar, el("div", done + " / " + total + " (" + percent + "%%)", "progress-text"));
    tr.append(progress);
    const counts = el("td", null, "counts");
    if (row.counts) {
      for (const [name, n] of Object.entries(row.counts)) counts.append(el("span", name + ": " + n));
    } else {
      counts.append(el("span", "completed: " + b.request_counts.completed),
                    el("span", "failed: " + b.request_counts.failed));
    }
    tr.append(counts);
    const errors = el("td");
    const list = el("ul", null, "errors");
    for (const e of row.errors) list.append(el("li", e.count + (e.count === 1 ? " attempt: " : " attempts: ") + e.text));
    if (b.errors && b.errors.data) {
      for (const e of b.errors.data.slice(0, 5)) list.append(el("li", (e.line ? "line " + e.line + ": " : "") + e.message));
    }
    errors.append(list);
    tr.append(errors);
    const files = el("td");
    files.append(download(b.input_file_id, "input"));
    if (b.output_file_id) files.append(download(b.output_file_id, "output"));
    if (b.error_file_id) files.append(download(b.error_file_id, "errors"));
    tr.append(files);
    body.append(tr);
  }
  table.hidden = rows.length === 0;
  document.getElementById("empty").hidden = rows.length !== 0;
}

async function refresh() {
  let reply;
  try {
    reply = await fetch("/ui/batches", {headers: headers()});
  } catch (error) {
    setState("server unreachable; retrying");
    return schedule();
  }
  if (reply.status === 401) {
    sessionStorage.removeItem(STORAGE);
    document.getElementById("login").hidden = false;
    setState("enter an API key");
    return;
  }
  if (!reply.ok) { setState("error " + reply.status); return schedule(); }
  const data = await reply.json();
  render(data.batches);
  renderWorkers(data.workers);
  const running = data.batches.filter((row) => !TERMINAL.has(row.batch.status)).length;
  setState(running ? running + " running, updated " + new Date().toLocaleTimeString()
                   : "all batches ended, updated " + new Date().toLocaleTimeString());
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  schedule();
}

function renderWorkers(seen) {
  const line = document.getElementById("workers");
  line.dataset.live = String(seen.live);
  line.dataset.missing = String(seen.missing);
  let text = seen.live ? "workers: " + seen.live + " working, " + seen.holding + " items in hand"
                       : "no worker seen lately: batches wait for one";
  if (seen.missing) text += "; " + seen.missing + " missing";
  if (seen.notes.length) text += " (" + seen.notes.join("; ") + ")";
  line.textContent = text;
  line.hidden = false;
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromAddress();
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORAGE, document.getElementById("key").value.trim());
    document.getElementById("login").hidden = true;
    refresh();
  });
  refresh();
});
""" % {"refresh": REFRESH_MS}
