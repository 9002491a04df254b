// The xpyd dashboard: one page, no build step, no CDN. Data comes from the coordinator:
// the history of the chosen range once, then one `tick` a second over
// /v1/dashboard/stream (read with fetch so the admin key can be sent).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("xpyd-key") || "",
  range: 300,
  points: [],
  events: [],
  audit: [],
  advisor: null,
  ticks: 0,
  lastTick: null,
  whatifs: 0,
};
// Tests and curious operators read the page's view of the cluster here.
window.xpyd = state;

// Inputs the operator has typed in: the live values no longer overwrite them.
const edited = new Set();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const text = await r.text();
  let v = text;
  try { v = JSON.parse(text); } catch (_) { /* plain text */ }
  if (r.status === 401 || r.status === 403) askKey();
  return { status: r.status, body: v };
}

function errorText(res) {
  const e = res.body && res.body.error;
  if (e && e.message) return `${res.status}: ${e.message}`;
  return `${res.status}: ${typeof res.body === "string" ? res.body : JSON.stringify(res.body)}`;
}

function askKey() {
  $("keyform").hidden = false;
}

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("xpyd-key", state.key);
  $("keyform").hidden = true;
  loadHistory();
});

function setConn(ok, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = "tag " + (ok ? "good" : "bad");
}

// ───────────────────────────── formatting ─────────────────────────────

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

const num = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const clock = (ms) => new Date(ms).toLocaleTimeString();
function duration(s) {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
function layoutName(l) {
  if (!l) return "–";
  if (typeof l === "string") return l;
  if (l.Disaggregated) return `${l.Disaggregated.prefill}P${l.Disaggregated.decode}D`;
  if (l.Aggregated) return `aggregated ×${l.Aggregated.workers}`;
  return JSON.stringify(l);
}

// ───────────────────────────── charts ─────────────────────────────

const COLORS = ["#2f7ed8", "#d9534f", "#5cb85c", "#f0ad4e", "#8e44ad"];
const CHARTS = [
  { title: "Requests /s", series: [["served", (p) => p.qps - p.failed_qps], ["failed", (p) => p.failed_qps]] },
  { title: "TTFT ms", series: [["p50", (p) => p.ttft_ms.p50], ["p90", (p) => p.ttft_ms.p90], ["p99", (p) => p.ttft_ms.p99]] },
  { title: "TPOT ms", series: [["p50", (p) => p.tpot_ms.p50], ["p90", (p) => p.tpot_ms.p90], ["p99", (p) => p.tpot_ms.p99]] },
  {
    title: "Queue depth",
    series: [
      ["coordinator", (p) => p.coordinator_queue],
      ["prefill", (p) => p.queue.prefill],
      ["decode", (p) => p.queue.decode],
      ["combined", (p) => p.queue.combined],
    ],
  },
  {
    title: "Running",
    series: [["prefill", (p) => p.running.prefill], ["decode", (p) => p.running.decode], ["combined", (p) => p.running.combined]],
  },
  {
    title: "KV blocks used",
    series: [["prefill", (p) => p.kv_used.prefill], ["decode", (p) => p.kv_used.decode], ["combined", (p) => p.kv_used.combined]],
  },
  { title: "KV transfer GB/s", series: [["prefill → decode", (p) => p.kv_gbps]] },
  { title: "Prefix-cache hits %", series: [["hit %", (p) => (p.prefix_hit === null ? null : p.prefix_hit * 100)]] },
  { title: "Tokens /s", series: [["output", (p) => p.output_tps], ["prompt", (p) => p.input_tps]] },
];

function chartWidth() {
  const w = $("charts").clientWidth || 900;
  return Math.max(280, Math.floor(w / 3) - 16);
}

function makeCharts() {
  const width = chartWidth();
  for (const c of CHARTS) {
    const box = el("div", null, "chart");
    box.dataset.title = c.title;
    $("charts").appendChild(box);
    const opts = {
      title: c.title,
      width,
      height: 170,
      legend: { live: false },
      scales: { x: { time: true } },
      series: [{}].concat(c.series.map(([label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))),
      axes: [{}, { size: 50 }],
    };
    c.plot = new uPlot(opts, [[], ...c.series.map(() => [])], box);
  }
  window.addEventListener("resize", () => {
    const w = chartWidth();
    for (const c of CHARTS) c.plot.setSize({ width: w, height: 170 });
  });
}

function drawCharts() {
  const xs = state.points.map((p) => p.t_ms / 1000);
  for (const c of CHARTS) {
    const ys = c.series.map(([, f]) => state.points.map((p) => {
      const v = f(p);
      return v === undefined ? null : v;
    }));
    c.plot.setData([xs, ...ys]);
  }
}

function addPoint(p) {
  if (!p) return;
  const last = state.points[state.points.length - 1];
  if (last && last.t_ms >= p.t_ms) return;
  state.points.push(p);
  const from = p.t_ms - state.range * 1000;
  while (state.points.length && state.points[0].t_ms < from) state.points.shift();
}

async function loadHistory() {
  const res = await api("GET", `/v1/dashboard/history?range_s=${state.range}`);
  if (res.status === 200) {
    state.points = res.body.points;
    drawCharts();
  }
}

$("range").addEventListener("change", () => {
  state.range = Number($("range").value);
  loadHistory();
});

// ───────────────────────────── topology and scale ─────────────────────────────

function drawTopology(t) {
  const rows = t.workers.map((w) => {
    const total = w.kv_blocks_used + w.kv_blocks_free;
    const kv = el("td");
    kv.appendChild(el("span", `${w.kv_blocks_used} / ${total}`));
    const bar = el("div", null, "bar");
    const fillBar = el("div");
    fillBar.style.width = total ? `${(100 * w.kv_blocks_used) / total}%` : "0";
    bar.appendChild(fillBar);
    kv.appendChild(bar);
    const st = el("td", w.state, `state state-${w.state}`);
    const tr = row([w.worker_id, w.role, st, w.queued, w.running, kv, w.routed, w.grpc_url, duration(w.up_s)]);
    tr.dataset.worker = w.worker_id;
    tr.dataset.state = w.state;
    return tr;
  });
  fill($("topology").tBodies[0], rows);
  const roles = {};
  for (const w of t.workers) if (w.state !== "down") roles[w.role] = (roles[w.role] || 0) + 1;
  const split = t.mode === "single" ? `aggregated ×${roles.combined || 0}` : `${roles.prefill || 0}P${roles.decode || 0}D`;
  $("split").textContent = `running ${split} · coordinator queue ${t.coordinator_queue}`;
  $("split").dataset.split = split;
  drawScale(t, roles);
}

function drawScale(t, roles) {
  $("scale").hidden = !t.scale;
  if (!t.scale) return;
  const names = t.mode === "single" ? ["combined"] : ["prefill", "decode"];
  if ($("scale-rows").childElementCount !== names.length) {
    $("scale-rows").replaceChildren(...names.map((role) => {
      const line = el("div", null, "row");
      line.appendChild(el("span", role, "role"));
      const n = el("input");
      n.type = "number";
      n.min = "1";
      n.max = "64";
      n.id = `scale-${role}`;
      n.addEventListener("input", () => edited.add(n.id));
      const b = el("button", "scale");
      b.addEventListener("click", async () => {
        const replicas = Number(n.value);
        if (!window.confirm(`Scale ${role} to ${replicas} replicas?`)) return;
        const res = await api("POST", "/v1/dashboard/scale", { role, replicas });
        $("scale-result").textContent = res.status === 200 ? `${role}: scaling to ${replicas}` : errorText(res);
        edited.delete(n.id);
      });
      line.append(n, b);
      return line;
    }));
  }
  // The inputs follow the cluster until the operator types in one.
  for (const role of names) setIfIdle(`scale-${role}`, roles[role] || 0);
}

// ───────────────────────────── advisor ─────────────────────────────

for (const id of ["adv-ttft", "adv-tpot", "adv-budget"]) {
  $(id).addEventListener("input", () => edited.add(id));
}

function setIfIdle(id, v) {
  const e = $(id);
  if (document.activeElement === e || edited.has(id)) return;
  if (e.type === "checkbox") e.checked = !!v;
  else e.value = v === null || v === undefined ? "" : String(v);
}

let curvePlot = null;
function drawCurve(curve) {
  const labels = curve.map((c) => c.layout);
  const xs = curve.map((_, i) => i);
  const ys = curve.map((c) => c.goodput);
  const box = $("adv-curve");
  if (!curvePlot) {
    curvePlot = new uPlot({
      width: Math.max(300, box.clientWidth || 420),
      height: 200,
      legend: { show: false },
      scales: {
        x: { time: false, range: (u, lo, hi) => [lo - 0.6, hi + 0.6] },
        y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] },
      },
      axes: [
        { values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? labels[v] || "" : "")), space: 30 },
        { label: "goodput /s", size: 50 },
      ],
      series: [{}, { label: "goodput /s", stroke: COLORS[0], fill: "rgba(47,126,216,0.35)", paths: uPlot.paths.bars({ size: [0.6, 60] }), points: { show: false } }],
    }, [xs, ys], box);
    curvePlot.labels = labels;
  } else {
    curvePlot.labels.splice(0, curvePlot.labels.length, ...labels);
    curvePlot.setData([xs, ys]);
  }
  box.dataset.splits = String(curve.length);
}

function drawAdvisor(a) {
  state.advisor = a;
  const c = a.config;
  setIfIdle("adv-enabled", c.enabled);
  setIfIdle("adv-auto", c.mode === "auto");
  setIfIdle("adv-ttft", c.slo.ttft_ms);
  setIfIdle("adv-tpot", c.slo.tpot_ms);
  setIfIdle("adv-budget", c.budget);
  const adv = a.advice;
  const lines = [
    ["current", a.current || "–"],
    ["recommended", adv ? adv.recommended : "–"],
    ["action", adv ? adv.action : a.status || "no advice yet"],
    ["observed → forecast rate /s", adv ? `${num(adv.observed_rate, 2)} → ${num(adv.forecast_rate, 2)}` : "–"],
    ["goodput /s now → after", adv ? `${num(adv.goodput.current, 2)} → ${num(adv.goodput.recommended, 2)}` : "–"],
    ["TTFT p90 ms now → after", adv ? `${num(adv.now.ttft_ms.p90, 0)} → ${num(adv.after.ttft_ms.p90, 0)}` : "–"],
    ["TPOT p90 ms now → after", adv ? `${num(adv.now.tpot_ms.p90, 1)} → ${num(adv.after.tpot_ms.p90, 1)}` : "–"],
    ["confidence", adv ? num(adv.confidence, 2) : "–"],
    ["desired", a.desired ? `${a.desired.layout} (generation ${a.desired.generation}, ${a.converged ? "running" : "converging"})` : "–"],
    ["profile", a.profile.error ? `none: ${a.profile.error}` : a.profile.source],
  ];
  fill($("adv-summary").tBodies[0], lines.map(([k, v]) => {
    const tr = row([k, v]);
    tr.dataset.key = k;
    return tr;
  }));
  $("adv-why").textContent = adv ? adv.why : "";
  $("adv-apply").disabled = !adv;
  $("adv-apply").dataset.recommended = adv ? adv.recommended : "";
  if (adv && adv.curve.length) drawCurve(adv.curve);
  fill($("adv-history").tBodies[0], (a.history || []).slice().reverse().map((h) => row([clock(h.at_ms), h.from, h.to, h.by])));
  for (const [id, v] of [["wi-ttft", c.slo.ttft_ms], ["wi-tpot", c.slo.tpot_ms], ["wi-budget", c.budget]]) {
    if ($(id).placeholder === "" && v !== null) $(id).placeholder = String(v);
  }
}

$("adv-save").addEventListener("click", async () => {
  const body = {
    enabled: $("adv-enabled").checked,
    mode: $("adv-auto").checked ? "auto" : "suggest",
    slo: { ttft_ms: Number($("adv-ttft").value), tpot_ms: Number($("adv-tpot").value) },
  };
  if ($("adv-budget").value !== "") body.budget = Number($("adv-budget").value);
  const res = await api("PUT", "/v1/advisor/config", body);
  $("adv-save-result").textContent = res.status === 200 ? "saved" : errorText(res);
  if (res.status === 200) for (const id of ["adv-ttft", "adv-tpot", "adv-budget"]) edited.delete(id);
});
for (const id of ["adv-enabled", "adv-auto"]) {
  $(id).addEventListener("change", () => $("adv-save").click());
}

$("adv-apply").addEventListener("click", async () => {
  const to = $("adv-apply").dataset.recommended;
  if (!window.confirm(`Apply the recommended split ${to}? Workers will be flipped, started or stopped.`)) return;
  const res = await api("POST", "/v1/advisor/apply", {});
  $("adv-apply-result").textContent = res.status === 200 ? `applied ${res.body.layout} (generation ${res.body.generation})` : errorText(res);
});

// What-if: every change asks the coordinator again (the latest answer wins).
let whatifTimer = null;
let whatifSeq = 0;
function whatifBody() {
  const b = {};
  const v = (id) => $(id).value.trim();
  if (v("wi-rate") !== "") b.rate = Number(v("wi-rate"));
  if (v("wi-budget") !== "") b.budget = Number(v("wi-budget"));
  const slo = {};
  if (v("wi-ttft") !== "") slo.ttft_ms = Number(v("wi-ttft"));
  if (v("wi-tpot") !== "") slo.tpot_ms = Number(v("wi-tpot"));
  if (Object.keys(slo).length) b.slo = slo;
  if (v("wi-input") !== "") b.input = v("wi-input");
  if (v("wi-output") !== "") b.output = v("wi-output");
  return b;
}
async function runWhatif() {
  const seq = ++whatifSeq;
  $("wi-result").textContent = "simulating…";
  const res = await api("POST", "/v1/advisor/whatif", whatifBody());
  if (seq !== whatifSeq) return;
  state.whatifs += 1;
  if (res.status !== 200) {
    $("wi-result").textContent = errorText(res);
    $("wi-result").dataset.status = String(res.status);
    fill($("wi-ranked").tBodies[0], []);
    return;
  }
  const w = res.body;
  const best = w.recommended;
  const fewest = w.fewest_units ? ` · fewest units for ${num(w.rate, 2)}/s: ${JSON.stringify(w.fewest_units)}` : "";
  $("wi-result").textContent = `best of ${w.budget} units: ${layoutName(best.layout)} at ${num(best.goodput && best.goodput.rate, 2)} requests/s — ${w.why}${fewest} (${num(w.seconds, 2)} s)`;
  $("wi-result").dataset.status = "200";
  $("wi-result").dataset.best = layoutName(best.layout);
  fill($("wi-ranked").tBodies[0], w.ranked.map((r) => row([
    layoutName(r.layout),
    r.goodput ? num(r.goodput.rate, 2) : `pruned (bound ${num(r.bound, 2)})`,
    r.goodput ? num(r.goodput.at.ttft.p90 * 1e3, 0) : "–",
    r.goodput ? num(r.goodput.at.tpot.p90 * 1e3, 1) : "–",
    r.goodput ? String(r.goodput.bottleneck).replace(/_/g, " ") : "–",
  ])));
}
for (const id of ["wi-rate", "wi-ttft", "wi-tpot", "wi-budget", "wi-input", "wi-output"]) {
  $(id).addEventListener("input", () => {
    clearTimeout(whatifTimer);
    whatifTimer = setTimeout(runWhatif, 400);
  });
}

// ───────────────────────────── events and audit ─────────────────────────────

const RANK = { Normal: 0, Warning: 1, Error: 2 };
function drawEvents() {
  const min = RANK[$("severity").value];
  const shown = state.events.filter((e) => RANK[e.severity] >= min).slice(-300).reverse();
  fill($("events").tBodies[0], shown.map((e) => {
    const tr = row([clock(e.time_ms), e.severity, e.subject, e.reason, e.message], `sev-${e.severity}`);
    tr.dataset.reason = e.reason;
    tr.dataset.subject = e.subject;
    tr.dataset.severity = e.severity;
    return tr;
  }));
}
$("severity").addEventListener("change", drawEvents);

function drawAudit() {
  fill($("audit").tBodies[0], state.audit.slice(-200).reverse().map((e) => {
    const tr = row([e.seq, clock(e.at_ms), e.who, e.action, JSON.stringify(e.request), e.status], e.status >= 400 ? "sev-Warning" : "");
    tr.dataset.action = e.action;
    return tr;
  }));
}

// ───────────────────────────── the stream ─────────────────────────────

function onTick(t) {
  state.ticks += 1;
  state.lastTick = t;
  $("service").textContent = t.service;
  $("mode").textContent = t.mode;
  addPoint(t.point);
  drawCharts();
  drawTopology(t);
  drawAdvisor(t.advisor);
  if (t.events.length) {
    state.events.push(...t.events);
    if (state.events.length > 2000) state.events.splice(0, state.events.length - 2000);
    drawEvents();
  }
  if (t.audit.length) {
    state.audit.push(...t.audit);
    if (state.audit.length > 1000) state.audit.splice(0, state.audit.length - 1000);
    drawAudit();
  }
}

function onMessage(chunk) {
  let event = "message";
  const data = [];
  for (const line of chunk.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (event === "tick" && data.length) onTick(JSON.parse(data.join("\n")));
}

async function stream() {
  for (;;) {
    try {
      const r = await fetch("/v1/dashboard/stream", { headers: authHeaders() });
      if (r.status === 401 || r.status === 403) {
        askKey();
        setConn(false, "admin key needed");
        await sleep(2000);
        continue;
      }
      setConn(true, "live");
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          onMessage(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } catch (_) {
      // The coordinator restarts or the network dropped: try again below.
    }
    setConn(false, "reconnecting");
    await sleep(1000);
  }
}

makeCharts();
loadHistory().then(stream);
