// Shared by the console's pages: the CSRF token, verb calls, the live feed, formatting.
"use strict";

const ds = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const csrf = meta("csrf-token");
  const scope = meta("scope");
  const mayAct = scope === "write";

  async function request(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRF-Token"] = csrf;
      init.body = JSON.stringify(body || {});
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      return { ok: false, status: 0, message: `no answer from the console (${err.message})` };
    }
    if (response.status === 401) {
      location.reload();  // the login page says how to get a new link
    }
    let data;
    try {
      data = await response.json();
    } catch (err) {
      data = { ok: false, message: `HTTP ${response.status}` };
    }
    if (data.ok === undefined) data.ok = response.ok;
    data.status = response.status;
    return data;
  }

  // One control verb, as the buttons send it: the daemon's reply, or its fault.
  const call = (verb, args) => request("POST", `/api/call/${encodeURIComponent(verb)}`, args);
  const get = (path) => request("GET", path);
  const stopAll = (args) => request("POST", "/api/stop-all", args);

  function follow(handlers) {
    const link = document.getElementById("link");
    const show = (state, text) => { link.dataset.state = state; link.textContent = text; };
    const source = new EventSource("/api/events");
    source.onopen = () => show("live", "live");
    source.onerror = () => show("lost", "reconnecting…");
    for (const [kind, fn] of Object.entries(handlers)) {
      source.addEventListener(kind, (ev) => fn(JSON.parse(ev.data)));
    }
    return source;
  }

  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "style") node.style.cssText = v;  // CSSOM, which the page's CSP allows (a style attribute it does not)
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  };

  const bytes = (n) => {
    if (!n) return "0";
    for (const [unit, size] of [["G", 1 << 30], ["M", 1 << 20], ["K", 1 << 10]]) {
      if (n >= size) return `${(n / size).toFixed(1)}${unit}`;
    }
    return `${n}`;
  };
  const age = (seconds) => {
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${Math.floor(seconds / size)}${unit}`;
    }
    return `${Math.max(0, Math.floor(seconds))}s`;
  };
  const ms = (ns) => `${(ns / 1e6).toFixed(ns < 1e7 ? 2 : 1)} ms`;

  // The one-line account of a stop report, as the row and the feedback show it.
  function reportLine(report) {
    if (!report) return "";
    const took = report.reaped_at && report.requested_at ? `, ${ms(report.reaped_at - report.requested_at)}` : "";
    return `${report.outcome} by ${report.ended_by}, ${report.survivors} survivor${report.survivors === 1 ? "" : "s"}${took}`;
  }

  // What a verb's reply says, for a person: the stop reports, true/false, or the fault with its number.
  function replyText(verb, key, reply) {
    if (!reply.ok) {
      if (reply.fault) return `${verb} ${key}: refused: fault ${reply.fault} ${reply.name}: ${reply.message}`;
      return `${verb} ${key}: refused (HTTP ${reply.status}): ${reply.message}`;
    }
    const r = reply.result;
    if (r && Array.isArray(r.reports)) {
      if (r.already_ended) return `${verb} ${key}: nothing was running (already ended)`;
      return `${verb} ${key}: ` + r.reports.map((x) => `${x.run_id}: ${reportLine(x)}`).join("; ");
    }
    if (r && r.report) return `${verb} ${key}: ${reportLine(r.report)}`;
    if (r === false) return `${verb} ${key}: nothing was running`;
    return `${verb} ${key}: ${JSON.stringify(r)}`;
  }

  function feedback(text, ok) {
    const box = document.getElementById("feedback");
    box.hidden = false;
    box.dataset.ok = ok ? "yes" : "no";
    box.textContent = text;
  }

  const LIVE = ["starting", "running", "paused", "stopping"];
  const ACTIONS = [
    ["stop", "Stop", "sessions.stop", (st) => LIVE.includes(st) && st !== "stopping"],
    ["kill", "Kill", "sessions.kill", (st) => LIVE.includes(st)],
    ["pause", "Pause", "sessions.pause", (st) => st === "running"],
    ["resume", "Resume", "sessions.resume", (st) => st === "paused"],
  ];

  // The four buttons of a session: each sends its verb and hands the reply to onReply.
  function actionButtons(key, onReply) {
    return ACTIONS.map(([action, label, verb]) => {
      const button = el("button", {
        type: "button", class: action === "kill" || action === "stop" ? "danger" : "", text: label,
        "aria-label": `${label} session ${key}`, dataset: { action, verb },
      });
      button.addEventListener("click", async () => {
        button.disabled = true;
        button.setAttribute("aria-busy", "true");
        const reply = await call(verb, { key });
        button.removeAttribute("aria-busy");
        onReply(verb, key, reply);
      });
      return button;
    });
  }

  // Enable the buttons that apply to the session's state (the daemon decides anyway).
  function syncButtons(container, state) {
    for (const [action, , , applies] of ACTIONS) {
      const button = container.querySelector(`[data-action="${action}"]`);
      if (button && !button.hasAttribute("aria-busy")) button.disabled = !applies(state);
    }
  }

  function logout() {
    const button = document.getElementById("logout");
    button.addEventListener("click", async () => {
      await request("POST", "/logout");
      location.reload();
    });
  }

  return { csrf, scope, mayAct, call, get, stopAll, follow, el, bytes, age, ms, reportLine, replyText, feedback,
           actionButtons, syncButtons, logout, LIVE };
})();
