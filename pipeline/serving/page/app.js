// The playground page: plain JS, no build step. Talks to /api/info, /api/generate (server-sent
// events over a POST, read with fetch's stream reader) and /api/stop.
"use strict";

const $ = (id) => document.getElementById(id);
// each mode's decoding settings come from the server (/api/info's defaults: evaluate's sampling to continue)
const MODES = {
  continue: { label: "Text to continue", placeholder: "ROMEO:" },
  translate: { label: "Sentence to translate", placeholder: "And God said, Let there be light." },
  ask: { label: "Question", placeholder: "Which book contains: 'Jesus wept.'?" },
};
const SETTINGS = ["temperature", "top_k", "top_p", "repetition_penalty", "beam_size", "length_penalty", "max_new_tokens"];
// The server's token, where it has one (bound beyond loopback): given in the URL it printed, sent on every API call
const TOKEN = new URLSearchParams(location.search).get("token");
const AUTH = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
const HEADERS = { "Content-Type": "application/json", ...AUTH };
let mode = "continue";
let card = null;
let current = null; // {id, controller} of the request decoding now

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : typeof x === "number" ? x.toFixed(digits).replace(/\.?0+$/, "") : String(x);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function table(head, rows) {
  const t = el("table", {}, el("tr", {}, ...head.map((h) => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  return t;
}

function setMode(next) {
  mode = next;
  for (const b of document.querySelectorAll("#modes button")) b.setAttribute("aria-selected", String(b.dataset.mode === mode));
  for (const m of ["continue", "translate", "ask"]) {
    for (const node of document.querySelectorAll(".mode-" + m)) node.hidden = !node.className.split(" ").includes("mode-" + mode);
  }
  $("text-label").textContent = MODES[mode].label;
  $("text").placeholder = MODES[mode].placeholder;
  if (card) for (const id of SETTINGS) $(id).value = card.defaults[mode][id];
  showChosen();
  const askable = !card || card.answers_questions;
  $("run").disabled = (mode === "ask" && !askable) || current !== null;
  $("status").textContent = mode === "ask" && !askable ? "This model was not trained to answer questions." : "";
}

// the beam search evaluate chose on val for the direction shown, offered in one click
function showChosen() {
  const box = $("chosen");
  const t = card && card.metrics ? card.metrics.translation.find((d) => d.to === ($("to").value || d.to)) : null;
  const c = t && t.chosen;
  box.replaceChildren();
  if (!c || !c.beam_size) { box.hidden = true; return; }
  box.hidden = mode !== "translate";
  const use = el("button", { type: "button", id: "use-chosen" }, "use it");
  use.addEventListener("click", () => {
    $("beam_size").value = c.beam_size;
    $("length_penalty").value = c.length_penalty;
    $("repetition_penalty").value = c.repetition_penalty;
  });
  box.append(`evaluate chose on val: beam ${c.beam_size}, length penalty ${c.length_penalty}, repetition penalty ${c.repetition_penalty} `, use);
}

function body() {
  const b = { mode, text: $("text").value };
  const number = (id) => Number($(id).value);
  b.max_new_tokens = number("max_new_tokens");
  b.repetition_penalty = number("repetition_penalty");
  if (mode === "continue") Object.assign(b, { temperature: number("temperature"), top_k: number("top_k"), top_p: number("top_p") });
  else Object.assign(b, { beam_size: number("beam_size"), length_penalty: number("length_penalty") });
  if (mode === "translate" && $("to").value) b.to = $("to").value;
  if (mode === "ask" && $("context").value.trim()) b.context = $("context").value;
  return b;
}

function finish(message, isError = false) {
  $("output").classList.toggle("error", isError);
  if (isError) $("generated").textContent = message;
  $("status").textContent = isError ? "error" : message;
  current = null;
  $("run").disabled = false;
  $("stop").disabled = true;
}

function handle(name, data) {
  if (name === "start") {
    current.id = data.id;
    $("status").textContent = data.note ? "decoding… (" + data.note + ")" : "decoding…";
  } else if (name === "token") {
    $("generated").textContent += data.text;
  } else if (name === "done") {
    const why = { eos: "finished", length: "reached the limit of new tokens", stopped: "stopped" }[data.reason] || data.reason;
    finish(`${why}: ${data.tokens} tokens in ${fmt(data.seconds, 2)} s`);
  } else if (name === "error") {
    finish(data.message, true);
  }
}

async function run(event) {
  event.preventDefault();
  if (current) return;
  $("output").classList.remove("error");
  $("prompt-echo").textContent = mode === "continue" ? $("text").value : "";
  $("generated").textContent = "";
  current = { id: null, controller: new AbortController() };
  $("run").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "waiting…";
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: HEADERS,
      body: JSON.stringify(body()),
      signal: current.controller.signal,
    });
    if (!response.ok) {
      const reason = await response.json().catch(() => ({ error: response.statusText }));
      return finish(reason.error || response.statusText, true);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const name = (block.match(/^event: (.*)$/m) || [])[1];
        const data = (block.match(/^data: (.*)$/m) || [])[1];
        if (name && data && current) handle(name, JSON.parse(data));
      }
    }
    if (current) finish("the connection closed");
  } catch (e) {
    if (current) finish(e.name === "AbortError" ? "stopped" : String(e), e.name !== "AbortError");
  }
}

async function stop() {
  if (!current) return;
  $("stop").disabled = true;
  const pending = current;
  if (pending.id) {
    await fetch("/api/stop", { method: "POST", headers: HEADERS, body: JSON.stringify({ id: pending.id }) }).catch(() => {});
  }
  // the stream ends with its "done: stopped" event; if it does not within a few seconds, let go of it
  setTimeout(() => { if (current === pending) pending.controller.abort(); }, 3000);
}

function curve(curves) {
  const series = [["train", curves.train || [], "#2f6fdd"], ["val", curves.val || [], "#d9822b"]].filter((s) => s[1].length);
  if (!series.length) return el("p", { class: "muted" }, "No loss curve yet (run the train stage).");
  const all = series.flatMap((s) => s[1]);
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  const W = 360, H = 170, L = 34, B = 18;
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - 6);
  const sy = (y) => 6 + (1 - (y - y0) / (y1 - y0 || 1)) * (H - B - 6);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "loss curves");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
  };
  add("line", { x1: L, y1: H - B, x2: W - 6, y2: H - B, stroke: "#aaa" });
  add("line", { x1: L, y1: 6, x2: L, y2: H - B, stroke: "#aaa" });
  add("text", { x: 2, y: 14, "font-size": 10, fill: "#666" }, fmt(y1, 2));
  add("text", { x: 2, y: H - B, "font-size": 10, fill: "#666" }, fmt(y0, 2));
  add("text", { x: W - 6, y: H - 4, "font-size": 10, fill: "#666", "text-anchor": "end" }, `step ${x1}`);
  series.forEach(([name, points, color], i) => {
    add("polyline", { points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "), fill: "none", stroke: color, "stroke-width": 1.5 });
    add("text", { x: W - 8, y: 16 + 12 * i, "font-size": 10, fill: color, "text-anchor": "end" }, name);
  });
  return svg;
}

function showCard(c) {
  const m = c.model || {};
  const facts = [
    ["architecture", m.arch ? `${m.arch}${m.arch === "gpt" ? `, ${m.n_layer} layers × ${m.n_embd}, ${m.n_head} heads, ${m.positions} positions` : `, ${m.n_layer} layers × ${m.n_hidden}`}` : "–"],
    ["parameters", c.parameters ? c.parameters.toLocaleString("en") : "–"],
    ["context", m.block_size ? `${m.block_size} tokens` : "–"],
    ["vocabulary", c.vocab_size.toLocaleString("en")],
    ["steps", c.train ? `${c.train.steps} (best ${c.best_step})` : fmt(c.best_step)],
    ["translates into", c.directions.length ? c.directions.join(", ") : "–"],
    ["answers questions", c.answers_questions ? "yes" : "no"],
  ];
  $("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const box = $("metrics");
  box.replaceChildren();
  if (!c.metrics) {
    box.append(el("p", { class: "note" }, "No metrics yet: this model has not been evaluated (run the evaluate stage: dvc repro)."));
  } else {
    if (!c.metrics_of_this_model) box.append(el("p", { class: "note" }, "These metrics are of the pipeline's last evaluation, which may be of another checkpoint."));
    const bpb = c.metrics.bits_per_byte;
    if (bpb) {
      box.append(el("h3", {}, "Val bits per byte (lower is better)"));
      box.append(table(["", "bits/byte"], [["model", fmt(bpb.bits_per_byte)], ["bigram", fmt(bpb.bigram_bits_per_byte)], ["unigram", fmt(bpb.unigram_bits_per_byte)]]));
    }
    if (c.metrics.translation.length) {
      box.append(el("h3", {}, "Translation, test (chrF / BLEU)"));
      const pair = (d) => (d ? `${fmt(d.chrf, 1)} / ${fmt(d.bleu, 1)}` : "–");
      box.append(table(["direction", "greedy", "beam", "copy"], c.metrics.translation.map((t) => [`${t.source} → ${t.to || "?"}`, pair(t.greedy), pair(t.beam), pair(t.copy_source)])));
    }
    if (c.metrics.understanding.length) {
      box.append(el("h3", {}, "Understanding, test (accuracy)"));
      box.append(table(["task", "model", "bigram", "chance"], c.metrics.understanding.map((u) => [u.task, fmt(u.model), fmt(u.bigram), fmt(u.chance, 2)])));
    }
    if (c.metrics.qa.length) {
      box.append(el("h3", {}, "Questions, test (exact match)"));
      box.append(table(["template", "greedy", "beam", "majority"], c.metrics.qa.map((q) => [q.group, fmt(q.greedy), fmt(q.beam), fmt(q.majority)])));
    }
  }
  $("curve").replaceChildren(curve(c.curves || {}));
}

async function init() {
  for (const b of document.querySelectorAll("#modes button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("form").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  try {
    const response = await fetch("/api/info", { headers: AUTH });
    card = await response.json();
    if (!response.ok) throw new Error(card.error || response.statusText);
  } catch (e) {
    $("status").textContent = "could not read the model's card: " + e;
    return;
  }
  $("checkpoint").textContent = card.checkpoint;
  const to = $("to");
  to.replaceChildren(...(card.directions.length ? card.directions : [""]).map((d) => el("option", { value: d }, d || "(the model's)")));
  to.addEventListener("change", showChosen);
  for (const id of ["max_new_tokens"]) $(id).max = card.limits.max_new_tokens;
  $("beam_size").max = card.limits.max_beam_size;
  showCard(card);
  setMode(mode);
  document.body.dataset.ready = "true";
}

init();
