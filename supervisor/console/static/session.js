// The session page: what it runs now, its usage over the run, its sub-agents, its runs' stop reports
// and egress logs (with the after-revoke check), live from the feed.
"use strict";

(() => {
  const key = document.body.dataset.key;
  const PAGE = 50;
  let current = null;  // the session info
  let series = { run_id: null, points: [] };
  const egressOffset = new Map();  // run id -> offset shown

  // -- now --------------------------------------------------------------------------------------------
  const actions = document.getElementById("actions");
  if (ds.mayAct) {
    actions.append(...ds.actionButtons(key, (verb, k, reply) => {
      ds.feedback(ds.replyText(verb, k, reply), reply.ok);
      load();
    }));
  }

  function summary(s) {
    const u = s.usage || {};
    const live = s.live && ds.LIVE.includes(s.state) ? s.live : null;
    const items = [
      ["state", s.state], ["agent", s.agent], ["generation", String(s.generation)],
      ["tokens", String(Math.round(u.tokens || 0))], ["tool_calls", String(u.tool_calls || 0)],
      ["cpu", `${(u.cpu_seconds || 0).toFixed(2)} s`],
      ["memory", live ? ds.bytes(live.memory_bytes) : `peak ${ds.bytes(u.peak_memory_bytes || 0)}`],
      ["processes", live ? String(live.processes) : "0"],
      ["parent", s.parent || "–"], ["active_run", s.active_run || "–"], ["last_outcome", s.last_outcome || "–"],
      ["age", ds.age(Date.now() / 1000 - s.created_wall)],
    ];
    const dl = document.getElementById("summary");
    dl.replaceChildren(...items.flatMap(([k, v]) => [ds.el("dt", { text: k.replace("_", " ") }),
                                                     ds.el("dd", { dataset: { field: k }, text: v })]));
    document.body.dataset.state = s.state;
    ds.syncButtons(actions, s.state);
  }

  // -- usage charts ------------------------------------------------------------------------------------
  const CHARTS = [["tokens", "tokens", (v) => String(Math.round(v))], ["cpu_seconds", "CPU (s)", (v) => v.toFixed(2)],
                  ["memory_bytes", "memory", ds.bytes]];

  function chart(points, field, label, fmt) {
    const w = 300, h = 80, ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("role", "img");
    const last = points.length ? points[points.length - 1][field] : 0;
    svg.setAttribute("aria-label", `${label} over the run: now ${fmt(last)}`);
    if (points.length > 1) {
      const t0 = points[0].t, t1 = points[points.length - 1].t || t0 + 1;
      const max = Math.max(...points.map((p) => p[field]), 1e-9);
      const xy = points.map((p) => `${((p.t - t0) / (t1 - t0 || 1)) * (w - 4) + 2},${h - 4 - (p[field] / max) * (h - 8)}`);
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", xy.join(" "));
      line.setAttribute("class", "line");
      svg.append(line);
    }
    return ds.el("figure", { class: "chart", dataset: { chart: field } }, svg,
                 ds.el("figcaption", { text: `${label}: ${fmt(last)}` }));
  }

  function drawCharts() {
    const box = document.getElementById("charts");
    document.getElementById("usage-run").textContent = series.run_id ? `run ${series.run_id}` : "";
    if (!series.points.length) {
      box.replaceChildren(ds.el("p", { class: "empty", text: "No samples: the console shows usage of runs it watched while they ran." }));
      return;
    }
    box.replaceChildren(...CHARTS.map(([f, l, fmt]) => chart(series.points, f, l, fmt)));
  }

  async function loadSeries(runId) {
    if (!runId) return;
    const reply = await ds.get(`/api/usage?run=${encodeURIComponent(runId)}`);
    if (reply.ok) {
      series = { run_id: runId, points: reply.points };
      drawCharts();
    }
  }

  // -- sub-agent tree ----------------------------------------------------------------------------------
  function tree(nodes) {
    const ul = document.getElementById("tree");
    ul.replaceChildren(...nodes.map((n) => ds.el("li", { style: `--depth: ${n.depth}`, dataset: { session: n.key } },
      n.key === key ? ds.el("strong", { text: n.key }) : ds.el("a", { href: `/session?key=${encodeURIComponent(n.key)}`, text: n.key }),
      ` · ${n.agent} · `, ds.el("span", { dataset: { field: "state" }, text: n.state }))));
  }

  // -- runs: the stop report's timeline, the egress log ----------------------------------------------------
  const MARKS = [["requested_at", "requested"], ["revoked_at", "revoked"], ["term_sent_at", "SIGTERM"],
                 ["kill_sent_at", "SIGKILL"], ["reaped_at", "reaped"]];

  // The stop drawn to scale: a tick per step on one bar, and beneath it the steps in order with their times.
  function timeline(report) {
    const present = MARKS.filter(([f]) => report[f]);
    const t0 = Math.min(...present.map(([f]) => report[f]));  // requested_at, or the earliest stamp of an older report
    const span = Math.max(Math.max(...present.map(([f]) => report[f])) - t0, 1);
    const offset = (f) => `+${ds.ms(report[f] - t0)}`;
    const bar = ds.el("div", { class: "timeline", role: "img",
      "aria-label": "stop timeline: " + present.map(([f, l]) => `${l} ${offset(f)}`).join(", ") });
    for (const [field, label] of present) {
      bar.append(ds.el("span", { class: `mark mark-${field}`, style: `left: ${((report[field] - t0) / span) * 100}%`,
                                 dataset: { mark: field }, title: `${label} ${offset(field)}` }));
    }
    const legend = ds.el("ol", { class: "legend" }, ...present.map(([f, l]) =>
      ds.el("li", { class: `mark-${f}` }, ds.el("span", { class: "swatch" }), `${l} ${offset(f)}`)));
    return ds.el("div", { class: "stop" }, bar, ds.el("div", { class: "scale" }, ds.el("span", { text: "0" }),
                 ds.el("span", { text: ds.ms(span) })), legend);
  }

  function reportBlock(run) {
    const r = run.report;
    if (!r) return ds.el("p", { class: "empty", text: ds.LIVE.includes(run.state) ? "Running: no stop report yet." : "No stop report stored." });
    const iso = r.isolation || {};
    const facts = [
      ["outcome", r.outcome], ["ended by", r.ended_by], ["revoke source", `${r.revoke_source}: ${r.revoke_reason}`],
      ["survivors", `${r.survivors}${r.survivor_pids?.length ? ` (pids ${r.survivor_pids.join(", ")})` : ""}`],
      ["swept", String(r.swept)], ["escaped", String(r.escaped)], ["refused after revoke", String(r.refused_after_revoke)],
      ["containment", r.containment], ["isolation", iso.mode ? `${iso.mode}: ${(iso.active || []).join(", ") || "none"}` +
        (iso.missing && iso.missing.length ? `; missing ${iso.missing.join(", ")}` : "") : "–"],
      ["revoke → reaped", r.reaped_at && r.revoked_at ? ds.ms(r.reaped_at - r.revoked_at) : "–"],
    ];
    if (r.failure) facts.push(["failure", r.failure]);
    return ds.el("div", { class: "report", dataset: { report: run.id } }, timeline(r),
      ds.el("dl", { class: "summary" }, ...facts.flatMap(([k, v]) => [ds.el("dt", { text: k }), ds.el("dd", { text: v })])));
  }

  async function egress(runId, box) {
    const offset = egressOffset.get(runId) || 0;
    const reply = await ds.get(`/api/egress?run=${encodeURIComponent(runId)}&offset=${offset}&limit=${PAGE}`);
    if (!reply.ok) {
      box.replaceChildren(ds.el("p", { class: "error", text: `egress log: ${reply.message}` }));
      return;
    }
    const late = reply.dispatched_after_revoke;
    const check = reply.revoked_at === null
      ? ds.el("p", { class: "check", dataset: { check: "not-revoked" }, text: "Not revoked (yet): nothing to check." })
      : late.length === 0
        ? ds.el("p", { class: "check pass", dataset: { check: "pass" },
                       text: `Pass: nothing was dispatched after the revoke (${reply.revoke_source}), checked over all ${reply.total} rows of the journal.` })
        : ds.el("div", { class: "check fail", dataset: { check: "fail" } },
                ds.el("p", { text: `FAIL: ${late.length} call(s) dispatched after the revoke:` }),
                ds.el("ul", {}, ...late.map((x) => ds.el("li", { text: `#${x.seq} ${x.tool} at +${ds.ms(x.t_ns - reply.revoked_at)}` }))));
    const outlived = reply.outlived_revoke.length === 0 ? null : ds.el("div", { class: "check warn", dataset: { check: "outlived" } },
      ds.el("p", { text: `${reply.outlived_revoke.length} blocking handler(s) were running at the revoke and could not be cut (no ctx.check() before their effect):` }),
      ds.el("ul", {}, ...reply.outlived_revoke.map((x) => ds.el("li", { text: `#${x.seq} ${x.tool}: ${x.detail}` }))));
    const rows = reply.rows.map((x) => ds.el("tr", { dataset: { decision: x.decision } },
      ds.el("td", { class: "num", text: String(x.seq) }),
      ds.el("td", { class: "num", text: reply.revoked_at ? `${x.t_ns > reply.revoked_at ? "+" : ""}${ds.ms(x.t_ns - reply.revoked_at)}` : "" }),
      ds.el("td", { text: x.verb }), ds.el("td", { text: x.tool || "" }),
      ds.el("td", { class: `decision decision-${x.decision}`, text: x.decision }),
      ds.el("td", { text: x.code === null ? "" : String(x.code) }), ds.el("td", { class: "detail", text: x.detail || "" })));
    const table = ds.el("table", { class: "egress" },
      ds.el("caption", { text: `Egress log: rows ${reply.total ? offset + 1 : 0}–${offset + reply.rows.length} of ${reply.total}` }),
      ds.el("thead", {}, ds.el("tr", {}, ...["#", "vs revoke", "verb", "tool", "decision", "code", "why"].map((h) => ds.el("th", { scope: "col", text: h })))),
      ds.el("tbody", {}, ...rows));
    const pager = ds.el("div", { class: "pager" },
      ds.el("button", { type: "button", text: "← Previous page", "aria-label": `previous page of run ${runId}'s egress log`,
                        disabled: offset === 0, onclick: () => { egressOffset.set(runId, Math.max(0, offset - PAGE)); egress(runId, box); } }),
      ds.el("button", { type: "button", text: "Next page →", "aria-label": `next page of run ${runId}'s egress log`,
                        disabled: offset + PAGE >= reply.total, onclick: () => { egressOffset.set(runId, offset + PAGE); egress(runId, box); } }));
    box.replaceChildren(...[check, outlived, table, pager].filter((n) => n));
  }

  function runCard(run) {
    const u = run.usage || {};
    const box = ds.el("div", { class: "egress-box" });
    const card = ds.el("article", { class: "card run", dataset: { run: run.id, state: run.state } },
      ds.el("h3", {}, `run ${run.id} `, ds.el("span", { class: "sub", text: `generation ${run.generation} · ${run.state} · ${run.kind} ${run.target}` })),
      ds.el("p", { class: "sub", text: `tokens ${u.tokens || 0} · tool calls ${u.tool_calls || 0} · CPU ${(u.cpu_seconds || 0).toFixed(2)} s · peak memory ${ds.bytes(u.peak_memory_bytes || 0)} · peak processes ${u.peak_processes || 0}` }),
      reportBlock(run), box);
    egress(run.id, box);
    return card;
  }

  // -- loading and following ---------------------------------------------------------------------------------
  async function load() {
    const reply = await ds.get(`/api/session?key=${encodeURIComponent(key)}`);
    if (!reply.ok) {
      ds.feedback(`${key}: ${reply.name ? `fault ${reply.fault} ${reply.name}: ` : ""}${reply.message}`, false);
      return;
    }
    current = { ...reply.session, live: current && current.live };
    summary(current);
    tree(reply.tree);
    const runs = [...reply.runs].reverse();  // newest first
    document.getElementById("runs").replaceChildren(...runs.map(runCard));
    if (!runs.length) document.getElementById("runs").append(ds.el("p", { class: "empty", text: "No runs yet." }));
    const watched = current.active_run || (runs[0] && runs[0].id);
    if (watched && watched !== series.run_id) loadSeries(watched);
    else drawCharts();
  }

  ds.follow({
    snapshot: () => load(),
    row: (r) => {
      if (r.key !== key) return;
      const wasLive = current && ds.LIVE.includes(current.state);
      current = { ...r, live: r.live || (current && current.live) };
      summary(current);
      if (!wasLive && ds.LIVE.includes(r.state)) load();  // a new run
    },
    sample: ({ key: k, run_id: runId, point }) => {
      if (k !== key) return;
      if (series.run_id !== runId) series = { run_id: runId, points: [] };
      series.points.push(point);
      if (current) { current.live = { ...point, run_id: runId }; summary(current); }
      drawCharts();
    },
    run: ({ key: k }) => { if (k === key) load(); },
    remove: ({ key: k }) => { if (k === key) ds.feedback(`${key} was removed (cleanup)`, false); },
  });
  ds.logout();
})();
