// fogline's chat page: streams /v1/chat/completions (SSE) and colours each token by where it was
// computed, from the `fogline.origin` field of every content chunk (edge | draft | cloud).
// The live panel polls /health and /metrics. No dependencies, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const ORIGINS = ["edge", "draft", "cloud"];
const history = [];  // the conversation sent with every request: [{role, content}]
let model = null;
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "body";
  if (text) body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(who, body, meta);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return { div, body, meta };
}

function addToken(body, text, origin) {
  const span = document.createElement("span");
  span.className = "tok tok-" + (ORIGINS.includes(origin) ? origin : "edge");
  span.dataset.origin = origin || "";
  span.textContent = text;
  body.append(span);
  $("log").scrollTop = $("log").scrollHeight;
}

function describe(stats, nTokens, seconds) {
  if (!stats) return "";
  const parts = ["mode " + stats.mode + (stats.auto ? " (auto chose " + stats.auto.arm + ")" : "")];
  parts.push(stats.edge_tokens + " edge, " + stats.cloud_tokens + " cloud tokens");
  if (stats.cloud_round_trips) parts.push(stats.cloud_round_trips + " round trips");
  if (nTokens > 1 && seconds > 0) parts.push(((nTokens - 1) / seconds).toFixed(1) + " tok/s");
  return parts.join(" · ");
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const body = {
    model: model || "fogline", messages: history, stream: true, mode: $("mode").value,
    temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  let reply = "", stats = null, first = null, last = null, n = 0;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || resp.status + " " + resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (piece) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            n += 1;
            reply += piece;
            addToken(out.body, piece, chunk.fogline && chunk.fogline.origin);
          } else if (chunk.fogline && chunk.fogline.mode) {
            stats = chunk.fogline;
          }
        }
      }
    }
    out.meta.textContent = describe(stats, n, first === null ? 0 : (last - first) / 1000);
    if (stats && stats.fallback) {
      const warn = document.createElement("div");
      warn.className = "meta warn";
      warn.textContent = "finished in edge mode: " + stats.fallback;
      out.div.append(warn);
    }
  } catch (e) {
    out.div.classList.add("error");
    out.meta.textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    history.push({ role: "assistant", content: reply });
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- the live panel

function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/(\w+)="([^"]*)"/g)) labels[kv[1]] = kv[2];
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

const sum = (samples) => (samples || []).reduce((a, s) => a + s.value, 0);
const byLabel = (samples, key, val) => sum((samples || []).filter((s) => s.labels[key] === val));
let prev = null;

async function poll() {
  try {
    const [h, m] = await Promise.all([
      fetch("/health").then((r) => r.json()),
      fetch("/metrics").then((r) => r.text()).then(parseMetrics),
    ]);
    if (h.model && !model) {
      model = h.model;
      $("model").textContent = h.model + " · K=" + h.split;
      if (h.default_mode) $("mode").value = h.default_mode;
    }
    $("p-status").textContent = h.status + (h.error ? ": " + h.error : "");
    const tokens = Object.fromEntries(ORIGINS.map((o) => [o, byLabel(m.fogline_edge_tokens_total, "origin", o)]));
    const total = tokens.edge + tokens.draft + tokens.cloud;
    const now = performance.now();
    if (prev) $("p-tps").textContent = ((total - prev.total) / ((now - prev.at) / 1000)).toFixed(1);
    prev = { total, at: now };
    $("p-share").textContent = total ? (100 * (tokens.edge + tokens.draft) / total).toFixed(0) + "%" : "–";
    $("p-tokens").textContent = tokens.edge + " / " + tokens.draft + " / " + tokens.cloud;
    const c = h.cloud || {};
    $("p-cloud").textContent = !c.configured ? "not configured (edge only)"
      : c.connected ? "connected" : "down" + (c.last_error ? ": " + c.last_error : "");
    $("p-rtt").textContent = c.rtt_ms == null ? "–" : c.rtt_ms.toFixed(1) + " ms";
    $("p-fallbacks").textContent = String(sum(m.fogline_edge_fallbacks_total));
    $("p-load").textContent = (h.running ?? "–") + " / " + (h.waiting ?? "–");
    const d = h.device;
    const t = d && d.temperature_c && d.temperature_c.max;
    const mem = d && d.memory && d.memory.available_bytes;
    $("p-device").textContent = !d ? "–" : [t != null ? t.toFixed(0) + " °C" : null,
      mem != null ? (mem / 2 ** 20).toFixed(0) + " MiB free" : null,
      d.load && d.load["1m"] != null ? "load " + d.load["1m"].toFixed(2) : null,
      d.throttled ? "throttled" : null, d.hot ? "hot" : null].filter(Boolean).join(" · ") || "–";
  } catch (e) {
    $("p-status").textContent = "unreachable: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = localStorage.getItem("fogline_api_key") || "";
  $("api_key").addEventListener("change", () => localStorage.setItem("fogline_api_key", $("api_key").value));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
  poll();
  setInterval(poll, 2000);
});
