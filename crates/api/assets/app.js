// sandpen's page: plain JavaScript, no build step (docs/ui.md). Every value
// that comes from a sandbox (hosts, paths, reasons) is set as text, never
// as HTML. The session cookie was set by /boot.js; every call here carries it.
"use strict";

const $ = (sel, el) => (el || document).querySelector(sel);

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (v !== false && v != null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (r.status === 401) throw new Error("This page's session has ended: open the address that `sandpen ui` printed.");
  if (!r.ok) throw new Error((data && data.error) || ("the server answered " + r.status));
  return data;
}

// A long operation: polls its job until done, showing its lines.
async function runJob(start, box) {
  box.hidden = false;
  const pre = $("pre", box), bar = $("progress", box);
  bar.removeAttribute("value");
  pre.textContent = "";
  const { job } = await start;
  for (;;) {
    const j = await api("GET", "/api/jobs/" + job);
    pre.textContent = j.lines.join("\n");
    pre.scrollTop = pre.scrollHeight;
    if (j.done) {
      bar.max = 1; bar.value = 1;
      if (!j.ok) throw new Error(j.error);
      return j.result;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

// ---- navigation ----
const views = ["start", "sandboxes", "activity", "decisions", "settings"];
let current = null;
function go(view) {
  if (!views.includes(view)) view = "sandboxes";
  current = view;
  for (const v of views) $("#view-" + v).hidden = v !== view;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === view);
  if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
  showError("");
  ({ start: loadStart, sandboxes: loadSandboxes, activity: loadActivity, settings: loadSettings, decisions: loadDecisions }[view])()
    .catch((e) => showError(e.message));
}

// ---- first run ----
let setup = null;
async function loadStart() {
  if (!setup) setup = await api("GET", "/api/setup");
  const agent = $("#fr-agent"), service = $("#fr-service"), presets = $("#fr-presets");
  if (!agent.options.length) {
    for (const a of setup.agents) agent.append(h("option", { value: a.name, disabled: !!a.unavailable }, a.title));
    for (const s of setup.services) service.append(h("option", { value: s }, s));
    for (const p of setup.presets) {
      presets.append(h("label", { class: "preset" },
        h("input", { type: "radio", name: "preset", value: p.name, checked: p.name === "balanced" }),
        " " + p.name, h("small", {}, p.words)));
    }
    if (setup.has_policy) {
      // A policy exists: start from its preset, so that Start does not change it unasked.
      const p = await api("GET", "/api/policy");
      const mine = $("input[name=preset][value='" + p.preset + "']");
      if (mine) mine.checked = true;
    }
    agent.addEventListener("change", () => {
      const a = setup.agents.find((x) => x.name === agent.value);
      if (a && a.services.length) service.value = a.services[0];
    });
  }
}

async function checkFolder() {
  const input = $("#fr-folder"), status = $("#fr-folder-status");
  status.className = "status"; status.textContent = "checking…";
  try {
    const r = await api("POST", "/api/folder", { path: input.value.trim() });
    status.className = "status ok"; status.textContent = "✓ " + r.path;
    return r.path;
  } catch (e) {
    status.className = "status bad"; status.textContent = e.message;
    throw e;
  }
}

async function firstRun(ev) {
  ev.preventDefault();
  showError("");
  const button = $("#fr-start");
  button.disabled = true;
  try {
    const path = await checkFolder();
    const agent = $("#fr-agent").value;
    const key = $("#fr-key");
    if (key.value) {
      await api("POST", "/api/secrets", { service: $("#fr-service").value, value: key.value });
      key.value = "";
      key.placeholder = "stored";
    } else if (agent !== "shell") {
      throw new Error("The agent needs its API key: paste it in step 3.");
    }
    const preset = ($("input[name=preset]:checked") || {}).value || "balanced";
    await api("POST", "/api/policy/preset", { preset });
    const existing = (await api("GET", "/api/sandboxes")).find((s) => s.workspace === path);
    let name;
    if (existing) {
      name = existing.name;
      await runJob(api("POST", "/api/sandboxes/" + encodeURIComponent(name) + "/start"), $("#fr-progress"));
    } else {
      const r = await runJob(api("POST", "/api/sandboxes", { workspace: path, agent, start: true }), $("#fr-progress"));
      name = r.name;
    }
    go("sandboxes");
    openTerminal(name);
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- sandboxes ----
const cpuSeen = new Map(); // name -> [time ms, cpu µs]
function cpuPercent(s) {
  const usec = s.resources && s.resources.usage && s.resources.usage.cpu_usec;
  if (usec == null) return "-";
  const now = Date.now(), before = cpuSeen.get(s.name);
  cpuSeen.set(s.name, [now, usec]);
  if (!before || now <= before[0]) return "…";
  return ((usec - before[1]) / 1000 / (now - before[0]) * 100).toFixed(0) + " %";
}
function bytes(n) {
  if (n == null) return "-";
  const u = ["B", "K", "M", "G", "T"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + u[i];
}
function uptime(s) {
  if (s == null) return "-";
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

let sandboxTimer = null;
async function loadSandboxes() {
  clearTimeout(sandboxTimer);
  const list = await api("GET", "/api/sandboxes");
  const body = $("#sb-table tbody");
  body.replaceChildren(...list.map((s) => {
    const r = s.resources, mem = r && r.usage ? bytes(r.usage.memory_bytes) + (r.limits ? " / " + bytes(r.limits.memory_max) : "") : "-";
    const running = s.status === "running";
    const act = (what) => () => sandboxAction(s.name, what).catch((e) => showError(e.message));
    return h("tr", { "data-name": s.name },
      h("td", {}, s.name),
      h("td", {}, s.status + (s.reason ? " (" + s.reason + ")" : "")),
      h("td", {}, s.agent),
      h("td", {}, uptime(s.uptime_secs)),
      h("td", {}, running ? cpuPercent(s) : "-"),
      h("td", {}, mem),
      h("td", { class: "mono" }, s.workspace),
      h("td", {},
        running ? h("button", { onclick: () => openTerminal(s.name) }, "Terminal") : null,
        running ? h("button", { onclick: act("stop") }, "Stop") : h("button", { onclick: act("start") }, "Start"),
        h("button", { onclick: () => { actSandbox = s.name; go("activity"); } }, "What it did"),
        h("button", { onclick: act("rm") }, "Remove")));
  }));
  $("#sb-empty").hidden = list.length > 0;
  if (current === "sandboxes") sandboxTimer = setTimeout(() => loadSandboxes().catch((e) => showError(e.message)), 2000);
}

async function sandboxAction(name, what) {
  const n = encodeURIComponent(name);
  let start;
  if (what === "rm") {
    if (!confirm("Remove sandbox " + name + " and everything it stored (not your folder)?")) return;
    start = api("DELETE", "/api/sandboxes/" + n + "?force=true");
  } else {
    start = api("POST", "/api/sandboxes/" + n + "/" + what);
  }
  await runJob(start, $("#sb-job"));
  await loadSandboxes();
}

// ---- terminal: xterm.js on a websocket to the same exec as `sandpen exec -it` ----
let term = null, sock = null, fit = null;
function openTerminal(name) {
  closeTerminal();
  $("#term-box").hidden = false;
  $("#term-title").textContent = "Terminal: " + name;
  $("#term-state").textContent = "connecting…";
  term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("#terminal"));
  fit.fit();
  const q = new URLSearchParams({ rows: term.rows, cols: term.cols });
  sock = new WebSocket("ws://" + location.host + "/api/sandboxes/" + encodeURIComponent(name) + "/exec?" + q);
  sock.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  sock.onopen = () => { $("#term-state").textContent = "connected"; term.focus(); };
  sock.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      $("#term-state").textContent = m.error ? m.error : "exited with status " + m.exit;
    } else {
      term.write(new Uint8Array(ev.data));
    }
  };
  sock.onclose = () => { if ($("#term-state").textContent === "connected") $("#term-state").textContent = "closed"; };
  term.onData((d) => { if (sock.readyState === 1) sock.send(enc.encode(d)); });
  term.onResize(({ rows, cols }) => { if (sock.readyState === 1) sock.send(JSON.stringify({ resize: { rows, cols } })); });
  window.sandpenTerminal = term; // for the test suite and the curious
}
function closeTerminal() {
  if (sock) sock.close();
  if (term) term.dispose();
  sock = term = null;
  $("#term-box").hidden = true;
}
window.addEventListener("resize", () => { if (fit) fit.fit(); });

// ---- what it did ----
let actSandbox = null, events = null;
async function loadActivity() {
  const list = await api("GET", "/api/sandboxes");
  const sel = $("#act-sandbox");
  sel.replaceChildren(...list.map((s) => h("option", { value: s.name }, s.name)));
  if (!list.length) { $("#act-live").textContent = "no sandbox yet"; return; }
  if (!actSandbox || !list.some((s) => s.name === actSandbox)) actSandbox = list[0].name;
  sel.value = actSandbox;
  follow(actSandbox);
}

function time(t) { return String(t).replace("T", " ").replace(/\.\d+/, "").replace("Z", ""); }

function follow(name) {
  if (events) events.close();
  $("#act-net tbody").replaceChildren();
  $("#act-files tbody").replaceChildren();
  $("#act-live").textContent = "connecting…";
  loadFlow(name).catch((e) => showError(e.message));
  events = new EventSource("/api/sandboxes/" + encodeURIComponent(name) + "/events");
  events.addEventListener("live", () => { $("#act-live").textContent = "live"; });
  events.addEventListener("net", (ev) => addNet(name, JSON.parse(ev.data)));
  events.addEventListener("file", (ev) => {
    const r = JSON.parse(ev.data);
    if (r.kind === "label") loadFlow(name).catch(() => {});
    $("#act-files tbody").prepend(h("tr", {},
      h("td", {}, time(r.time)), h("td", {}, r.kind), h("td", {}, r.op),
      h("td", { class: "mono" }, r.path), h("td", {}, r.rule), h("td", {}, r.error || "-")));
  });
  events.onerror = () => { $("#act-live").textContent = "reconnecting…"; };
}

// The guest process a network record names, when the log carries one (a
// name, or {pid, name|comm|exe}); from the guest: shown as text.
function processText(p) {
  if (!p) return "-";
  if (typeof p === "string") return p;
  const n = p.name || p.comm || p.exe;
  if (!n) return "-";
  return p.pid != null ? n + " (" + p.pid + ")" : n;
}

function addNet(name, r) {
  const denied = r.decision === "deny";
  const dest = r.host + ":" + r.port;
  const allow = denied ? h("button", { class: "allow", onclick: async (ev) => {
    ev.target.disabled = true;
    try {
      const rule = await api("POST", "/api/policy/rules", { action: "allow", target: dest, sandbox: name });
      ev.target.textContent = "allowed (rule " + rule.id + ")";
    } catch (e) { ev.target.disabled = false; showError(e.message); }
  } }, "allow this") : null;
  $("#act-net tbody").prepend(h("tr", { class: "net-" + r.decision },
    h("td", {}, time(r.time)),
    h("td", { class: denied ? "deny" : "allow" }, r.decision),
    h("td", { class: "mono" }, dest),
    h("td", { class: "mono" }, r.method ? r.method + " " + (r.path || "") : "-"),
    h("td", { class: "mono" }, processText(r.process)),
    h("td", {}, r.rule || "-"),
    h("td", {}, bytes(r.bytes_up) + " / " + bytes(r.bytes_down)),
    h("td", {}, r.reason),
    h("td", {}, allow)));
}

async function loadFlow(name) {
  const f = await api("GET", "/api/sandboxes/" + encodeURIComponent(name) + "/flow");
  const box = $("#act-flow");
  if (!f.labels.length) { box.replaceChildren(h("p", { class: "hint" }, "No flow labels: egress is not narrowed.")); return; }
  box.replaceChildren(...f.labels.map((l) => h("div", { class: "flow" },
    h("strong", {}, l.label), " since " + time(l.at) + ", by ", h("span", { class: "mono" }, l.by))),
    h("button", { onclick: async () => {
      try { await api("POST", "/api/sandboxes/" + encodeURIComponent(name) + "/flow/reset"); await loadFlow(name); }
      catch (e) { showError(e.message); }
    } }, "Reset flow labels"));
}

// ---- decisions: ask mode (docs/policy.md, "Ask mode") ----
// Hosts, request lines and processes come from the guest, and the reason
// from the agent: all set as text, the reason marked as the agent's.
let decTimer = null;
async function loadDecisions() {
  // Each part shows what it can: a failing one does not hide the other.
  await Promise.all([loadSuggestions().catch((e) => showError(e.message)), loadPending()]);
}

async function loadPending() {
  clearTimeout(decTimer);
  const d = await api("GET", "/api/decisions");
  const box = $("#dec-list");
  if (!d.pending.length) {
    box.replaceChildren(h("p", { class: "hint" }, "Nothing is waiting. In ask mode, a connection that no rule decides waits here for your answer."));
  } else {
    box.replaceChildren(h("table", { id: "dec-table" },
      h("thead", {}, h("tr", {}, ...["Sandbox", "Destination", "Request", "Process", "The agent says (not verified)", "Waiting", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, ...d.pending.map((p) => h("tr", { "data-id": p.sandbox + "/" + p.id },
        h("td", {}, p.sandbox),
        h("td", { class: "mono" }, p.file ? "file " + p.file + " " + p.host : (p.host.includes(":") ? "[" + p.host + "]" : p.host) + ":" + p.port),
        h("td", { class: "mono" }, p.first || "-"),
        h("td", { class: "mono" }, p.process || "-"),
        h("td", { class: "agent" }, p.reason ? "\u201c" + p.reason + "\u201d" : "-"),
        h("td", {}, "since " + time(p.first_seen) + ", up to " + p.timeout_secs + " s"),
        h("td", {},
          decideButton(p, "once", "Allow once"),
          p.file ? null : decideButton(p, "always", "Allow always"),
          decideButton(p, "deny", "Deny")))))));
  }
  if (!$("#view-decisions").hidden) decTimer = setTimeout(() => loadPending().catch(() => {}), 2000);
}

function decideButton(p, decision, label) {
  return h("button", { "data-decision": decision, onclick: async () => {
    try {
      await api("POST", "/api/decisions/" + encodeURIComponent(p.sandbox) + "/" + p.id, { decision });
      await loadPending();
    } catch (e) { showError(e.message); }
  } }, label);
}

// ---- suggestions (`sandpen policy suggest`; docs/policy.md, "Suggestions") ----
// Loaded when the page opens and after Apply, not on a timer: the boxes the
// user ticked stay ticked. Hosts, domains and processes come from the guest.
let sugSandbox = null, sugShown = [];
function proposalWords(p) {
  switch (p.kind) {
    case "add": return "allow " + p.target;
    case "promote": return "allow " + p.target + " for all sandboxes (" + p.sandboxes.length + " have it: " + p.sandboxes.join(", ") + ")";
    case "remove": return "remove rule " + p.id + " (allow " + p.target + ", unused)";
    default: return JSON.stringify(p);
  }
}
async function loadSuggestions() {
  const list = await api("GET", "/api/sandboxes");
  const sel = $("#sug-sandbox");
  sel.replaceChildren(...list.map((s) => h("option", { value: s.name }, s.name)));
  const box = $("#sug-list");
  $("#sug-apply").hidden = true;
  if (!list.length) { sugShown = []; box.replaceChildren(h("p", { class: "hint" }, "No sandbox yet.")); return; }
  if (!sugSandbox || !list.some((s) => s.name === sugSandbox)) sugSandbox = (list.find((s) => s.name === actSandbox) || list[0]).name;
  sel.value = sugSandbox;
  sugShown = await api("GET", "/api/sandboxes/" + encodeURIComponent(sugSandbox) + "/suggestions");
  if (!sugShown.length) {
    box.replaceChildren(h("p", { class: "hint" }, "Nothing to suggest for " + sugSandbox + ". Learn mode (" ,
      h("span", { class: "mono" }, "sandpen policy mode learn " + sugSandbox), ") records what a stricter policy would deny."));
    return;
  }
  const when = (t) => t ? time(t) : "-";
  box.replaceChildren(h("table", { id: "sug-table" },
    h("thead", {}, h("tr", {}, ...["", "Proposal", "Site", "Seen", "First", "Last", "Sent", "Processes", "Flags"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...sugShown.map((s) => {
      const flagged = s.flags.length > 0;
      return h("tr", { "data-n": s.n, class: flagged ? "flagged" : "" },
        h("td", {}, h("input", { type: "checkbox", "data-n": s.n, checked: !flagged, "aria-label": "apply suggestion " + s.n })),
        h("td", { class: "mono" }, proposalWords(s.proposal)),
        h("td", { class: "mono" }, s.domain || "-"),
        h("td", {}, s.count ? s.count + " (" + s.sources.join(", ") + ")" : "-"),
        h("td", {}, when(s.first_seen)),
        h("td", {}, when(s.last_seen)),
        h("td", {}, s.count ? bytes(s.bytes_up) : "-"),
        h("td", { class: "mono" }, s.processes.length ? s.processes.join(", ") : "-"),
        h("td", { class: "flags" }, flagged ? "\u26a0 " + s.flags.join("; ") : "-"));
    }))));
  $("#sug-apply").hidden = false;
}

async function applySuggestions() {
  const out = $("#sug-out");
  const ticked = [...document.querySelectorAll("#sug-table input[type=checkbox]:checked")].map((c) => Number(c.dataset.n));
  if (!ticked.length) { out.className = "status bad"; out.textContent = "Nothing is ticked."; return; }
  const shown = ticked.map((n) => sugShown.find((s) => s.n === n).proposal);
  $("#sug-apply").disabled = true;
  try {
    const r = await api("POST", "/api/sandboxes/" + encodeURIComponent(sugSandbox) + "/suggestions/apply", { selection: ticked, shown });
    out.className = "status ok";
    out.textContent = r.applied.map((a) => a.n + ": " + a.done).join("; ");
    await loadSuggestions();
  } catch (e) {
    out.className = "status bad"; out.textContent = "";
    showError(e.message);
  } finally {
    $("#sug-apply").disabled = false;
  }
}

// ---- settings ----
let setScope = "";
async function loadSettings() {
  const list = await api("GET", "/api/sandboxes");
  const sel = $("#set-scope");
  sel.replaceChildren(h("option", { value: "" }, "all sandboxes (global)"),
    ...list.map((s) => h("option", { value: s.name }, "sandbox " + s.name)));
  sel.value = setScope;
  const q = setScope ? "?sandbox=" + encodeURIComponent(setScope) : "";
  const p = await api("GET", "/api/policy" + q);
  $("#set-mode").textContent = "Mode " + p.mode + ", preset " + p.preset + (p.held_back ? ". " + p.held_back : "");
  $("#set-rules tbody").replaceChildren(...p.rules.map((r) => h("tr", {},
    h("td", {}, r.id), h("td", {}, r.scope), h("td", { class: r.action }, r.action),
    h("td", { class: "mono" }, r.target), h("td", {}, r.source),
    h("td", {}, (r.scope === "global" && !setScope) || (r.scope === "sandbox" && setScope)
      ? h("button", { onclick: async () => {
          try { await api("DELETE", "/api/policy/rules/" + r.id + q); await loadSettings(); }
          catch (e) { showError(e.message); }
        } }, "Remove") : null))));
  $("#set-files").textContent = p.files || "Pick a sandbox to see the file rules it runs with.";
  const secrets = await api("GET", "/api/secrets");
  $("#set-secrets tbody").replaceChildren(...secrets.map((s) => h("tr", {},
    h("td", {}, s.service), h("td", {}, s.scope), h("td", { class: "mono" }, s.hosts.join(", ")), h("td", {}, time(s.set_at)),
    h("td", {}, h("button", { onclick: async () => {
      const sq = s.scope === "global" ? "" : "?sandbox=" + encodeURIComponent(s.scope.replace(/^sandbox /, ""));
      try { await api("DELETE", "/api/secrets/" + encodeURIComponent(s.service) + sq); await loadSettings(); }
      catch (e) { showError(e.message); }
    } }, "Remove")))));
  if (!setup) setup = await api("GET", "/api/setup");
  const svc = $("#set-secret select");
  if (!svc.options.length) for (const s of setup.services) svc.append(h("option", { value: s }, s));
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => go(b.dataset.view));
  $("#first-run").addEventListener("submit", firstRun);
  $("#fr-folder").addEventListener("change", () => checkFolder().catch(() => {}));
  $("#term-close").addEventListener("click", closeTerminal);
  $("#sug-sandbox").addEventListener("change", (ev) => { sugSandbox = ev.target.value; $("#sug-out").textContent = ""; loadSuggestions().catch((e) => showError(e.message)); });
  $("#sug-refresh").addEventListener("click", () => loadSuggestions().catch((e) => showError(e.message)));
  $("#sug-apply").addEventListener("click", () => applySuggestions());
  $("#act-sandbox").addEventListener("change", (ev) => { actSandbox = ev.target.value; follow(actSandbox); });
  $("#set-scope").addEventListener("change", (ev) => { setScope = ev.target.value; loadSettings().catch((e) => showError(e.message)); });
  $("#set-add").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    try {
      await api("POST", "/api/policy/rules", { action: f.action.value, target: f.target.value.trim(), sandbox: setScope || null });
      f.target.value = "";
      await loadSettings();
    } catch (e) { showError(e.message); }
  });
  $("#set-check").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = $("#set-check-out");
    try {
      const r = await api("POST", "/api/policy/check", { target: ev.target.target.value.trim(), sandbox: setScope || null });
      out.className = "status " + (r.verdict === "deny" ? "bad" : "ok");
      out.textContent = r.host + ":" + r.port + " " + r.decision;
    } catch (e) { showError(e.message); }
  });
  $("#set-secret").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    try {
      await api("POST", "/api/secrets", { service: f.service.value, value: f.value.value, sandbox: setScope || null });
      f.value.value = "";
      await loadSettings();
    } catch (e) { showError(e.message); }
  });
  window.addEventListener("hashchange", () => go(location.hash.slice(1)));
  api("GET", "/api/sandboxes").then((list) => {
    const want = location.hash.slice(1);
    go(views.includes(want) ? want : (list.length ? "sandboxes" : "start"));
  }).catch((e) => showError(e.message));
});
