// The status page: fills the tables from the server's events
// (status/events, one JSON report a second) and looks tasks up by id.
// No framework and nothing loaded from elsewhere.
"use strict";

const prefix = document.body.dataset.prefix;
const $ = (id) => document.getElementById(id);

function duration(seconds) {
  seconds = Math.floor(seconds);
  if (seconds < 60) return seconds + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
  return Math.floor(seconds / 86400) + "d " + Math.floor((seconds % 86400) / 3600) + "h";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

const rate = (r) => (r >= 100 ? r.toFixed(0) : r.toFixed(1));

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// Two lines (put/s and finished/s) scaled to the larger.
function sparkline(history) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  const put = history.enqueued_per_second, done = history.finished_per_second;
  const max = Math.max(1e-9, ...put, ...done);
  for (const [values, name] of [[put, "put"], [done, "done"]]) {
    if (values.length < 1) continue;
    const step = values.length > 1 ? 120 / (values.length - 1) : 0;
    const points = values.map((v, i) => (i * step).toFixed(1) + "," + (23 - (v / max) * 22).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", name);
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
  }
  svg.dataset.samples = String(put.length);
  return svg;
}

function render(report) {
  const health = $("health");
  health.textContent = report.health;
  health.className = "badge " + report.health;
  $("uptime").textContent = duration(report.uptime_seconds);
  $("enqueued-rate").textContent = rate(report.enqueued_per_second);
  $("finished-rate").textContent = rate(report.finished_per_second);
  $("workers-alive").textContent = report.workers_alive;
  $("held").textContent = bytes(report.held_bytes) + " of " + bytes(report.held_bytes_limit);

  const queues = $("queues").tBodies[0];
  queues.replaceChildren();
  for (const q of report.queues) {
    const row = queues.insertRow();
    row.dataset.queue = q.queue;
    cell(row, q.queue, "name");
    cell(row, q.ready, "ready");
    cell(row, q.leased, "leased");
    cell(row, duration(q.oldest_ready_age_seconds), "age");
    cell(row, rate(q.enqueued_per_second), "enqueued-rate");
    cell(row, rate(q.finished_per_second), "finished-rate");
    cell(row, "", "history").appendChild(sparkline(q.history));
    cell(row, q.succeeded, "succeeded");
    cell(row, q.failed, q.failed > 0 ? "failed bad" : "failed");
    cell(row, q.expired, "expired");
    cell(row, q.failure_ratio === null ? "–" : (q.failure_ratio * 100).toFixed(1) + "%", "failure-ratio");
    cell(row, q.worker_streams, "worker-streams");
  }
  $("queues-empty").hidden = report.queues.length > 0;

  const workers = $("workers").tBodies[0];
  workers.replaceChildren();
  for (const w of report.workers) {
    const row = workers.insertRow();
    row.dataset.worker = w.worker;
    cell(row, w.worker, "name");
    cell(row, w.queue || "–", "queue");
    cell(row, w.in_flight, "in-flight");
    cell(row, w.leases.map((l) => l.task_id + " " + duration(l.expires_in_seconds)).join("\n"), "leases");
    cell(row, duration(w.last_seen_seconds_ago) + " ago", "last-seen");
    cell(row, w.alive ? "alive" : "silent", w.alive ? "" : "bad");
  }
  $("workers-note").textContent = report.workers_known > report.workers.length
    ? report.workers.length + " of " + report.workers_known + " workers, the most recently seen"
    : (report.workers.length ? "" : "No workers seen.");

  const failures = $("failures").tBodies[0];
  failures.replaceChildren();
  for (const f of report.recent_failures) {
    const row = failures.insertRow();
    row.dataset.task = f.task_id;
    cell(row, duration(f.seconds_ago) + " ago", "when");
    cell(row, f.queue, "queue");
    cell(row, f.task_id, "task");
    cell(row, f.attempts, "attempts");
    cell(row, f.worker || "–", "worker");
    cell(row, f.error, "error");
  }
  $("failures-empty").hidden = report.recent_failures.length > 0;
  const updates = Number(document.body.dataset.updates || 0) + 1;
  document.body.dataset.updates = String(updates);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() +
    " · history: one sample every " + report.history_interval_seconds + "s, one hour kept";
}

function connect() {
  const events = new EventSource(prefix + "/status/events");
  events.addEventListener("status", (e) => render(JSON.parse(e.data)));
  events.addEventListener("unavailable", (e) => {
    $("health").textContent = "store unavailable";
    $("health").className = "badge down";
    $("updated").textContent = e.data;
  });
  events.onerror = () => {
    $("health").textContent = "disconnected";
    $("health").className = "badge down";
  };
}

$("lookup").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = $("task-id").value.trim();
  const out = $("task");
  out.replaceChildren();
  if (!id) return;
  const answer = await fetch(prefix + "/status/task/" + encodeURIComponent(id), {
    headers: { Accept: "application/json" },
  });
  const task = await answer.json();
  for (const [key, value] of Object.entries(task)) {
    if (value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = key.replace(/_unix$/, "").replaceAll("_", " ");
    const dd = document.createElement("dd");
    dd.textContent = key.endsWith("_unix") ? new Date(value * 1000).toISOString() : String(value);
    dd.dataset.field = key;
    out.append(dt, dd);
  }
});

connect();
