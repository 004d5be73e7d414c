// The eventcast dashboard: plain JavaScript, no build step. It reads the hub's
// own Server-Sent Events stream (/dashboard/api/stream) for stats and the tail.
"use strict";

const $ = (id) => document.getElementById(id);
const previous = new Map(); // topic -> {count, time} for rates
let source = null;
let csrf = null; // the session's CSRF token (null when the hub needs none)

// Every state-changing request: a JSON body, and the session's CSRF token.
function post(path, body) {
  const headers = { "content-type": "application/json" };
  if (csrf) headers["x-csrf-token"] = csrf;
  return fetch(path, { method: "POST", credentials: "same-origin", headers, body: JSON.stringify(body) });
}

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = text(value);
  row.appendChild(td);
  return td;
}

function showStats(stats) {
  $("node").textContent = `${stats.node.name} · v${stats.node.version} · up ${stats.node.uptime}s`;
  const bp = $("backplane");
  bp.textContent = stats.backplane_up ? "backplane up" : "backplane down";
  bp.className = "badge " + (stats.backplane_up ? "up" : "down");
  $("c-ws").textContent = stats.connections.websocket;
  $("c-sse").textContent = stats.connections.sse;
  $("c-subs").textContent = stats.subscriptions;
  $("c-pub").textContent = stats.published;
  $("c-drop").textContent = stats.dropped;
  $("c-slow").textContent = stats.slow_disconnects;
  $("c-dead").textContent = stats.dead_letters;
  const nodes = $("nodes").querySelector("tbody");
  nodes.replaceChildren();
  for (const n of stats.nodes || []) {
    const row = document.createElement("tr");
    for (const value of [n.name, n.uid, n.version, `${n.uptime}s`, n.num_clients, n.num_users, n.num_channels, n.num_subs]) {
      cell(row, value);
    }
    nodes.appendChild(row);
  }
  const body = $("topics").querySelector("tbody");
  body.replaceChildren();
  const topics = [...stats.topics].sort((a, b) => b.last_time - a.last_time);
  for (const t of topics) {
    const row = document.createElement("tr");
    row.dataset.topic = t.topic;
    const before = previous.get(t.topic);
    let rate = "";
    if (before && stats.time > before.time) {
      rate = ((t.count - before.count) / (stats.time - before.time)).toFixed(1);
    }
    previous.set(t.topic, { count: t.count, time: stats.time });
    cell(row, t.topic);
    cell(row, t.count);
    cell(row, rate);
    cell(row, t.last_offset);
    cell(row, t.last_time ? new Date(t.last_time * 1000).toLocaleTimeString() : "");
    body.appendChild(row);
  }
  showConsumers(stats.consumers || []);
}

function showConsumers(consumers) {
  // The sources the hub consumes (docs/ingest.md); the section stays hidden without any.
  $("consumers-section").hidden = consumers.length === 0;
  const body = $("consumers").querySelector("tbody");
  body.replaceChildren();
  for (const c of consumers) {
    const row = document.createElement("tr");
    row.dataset.consumer = c.name;
    cell(row, c.name);
    cell(row, c.type);
    cell(row, c.state).className = "state-" + c.state;
    cell(row, c.processed);
    cell(row, c.lag === null ? "" : c.lag);
    cell(row, c.dead_letters);
    cell(row, c.errors);
    cell(row, c.last_error || "");
    body.appendChild(row);
  }
}

function showTail(message) {
  const list = $("tail");
  const item = document.createElement("li");
  const offset = message.offset === null ? "" : `#${message.offset} `;
  item.textContent = `${message.topic} ${offset}${JSON.stringify(message.data)}`;
  list.prepend(item);
  while (list.children.length > 100) list.lastChild.remove();
}

function openStream(patterns) {
  if (source) source.close();
  const query = patterns.map((p) => "tail=" + encodeURIComponent(p)).join("&");
  source = new EventSource("/dashboard/api/stream" + (query ? "?" + query : ""), { withCredentials: true });
  source.addEventListener("stats", (e) => showStats(JSON.parse(e.data)));
  source.addEventListener("tail", (e) => showTail(JSON.parse(e.data)));
  source.onerror = async () => {
    const response = await fetch("/dashboard/api/stats", { credentials: "same-origin" });
    if (response.status === 401) {
      source.close();
      showLogin();
    }
  };
}

async function loadDeadLetters() {
  const response = await fetch("/dashboard/api/dead-letters", { credentials: "same-origin" });
  if (!response.ok) return;
  const letters = await response.json();
  const body = $("dead").querySelector("tbody");
  body.replaceChildren();
  for (const letter of letters) {
    const row = document.createElement("tr");
    for (const key of ["id", "topic", "subscriber", "reason", "attempts", "error"]) cell(row, letter[key]);
    const action = cell(row, "");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Redrive";
    button.addEventListener("click", () => redrive([letter.id]));
    action.appendChild(button);
    body.appendChild(row);
  }
}

async function redrive(ids) {
  await post("/dashboard/api/dead-letters/redrive", ids ? { ids } : {});
  await loadDeadLetters();
}

function showLogin() {
  $("main").hidden = true;
  $("login").hidden = false;
}

async function start() {
  const session = await fetch("/dashboard/api/session", { credentials: "same-origin" });
  if (session.status === 401) {
    showLogin();
    return;
  }
  csrf = (await session.json()).csrf;
  const response = await fetch("/dashboard/api/stats", { credentials: "same-origin" });
  $("login").hidden = true;
  $("main").hidden = false;
  showStats(await response.json());
  openStream(($("tail-pattern").value || "").split(/[\s,]+/).filter(Boolean));
  await loadDeadLetters();
  setInterval(loadDeadLetters, 5000);
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const response = await post("/dashboard/api/login", { token: $("login-token").value });
  if (response.ok) {
    $("login-error").textContent = "";
    await start();
  } else {
    $("login-error").textContent = "wrong token";
  }
});

$("tail-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("tail").replaceChildren();
  openStream($("tail-pattern").value.split(/[\s,]+/).filter(Boolean));
});

$("publish-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = $("publish-result");
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (error) {
    result.textContent = "data is not valid JSON";
    return;
  }
  const response = await post("/dashboard/api/publish", { topic: $("publish-topic").value, data });
  const body = await response.json();
  result.textContent = response.ok
    ? `published${body.offset ? " at offset " + body.offset : ""}`
    : body.error;
});

$("redrive-all").addEventListener("click", () => redrive(null));

start();
