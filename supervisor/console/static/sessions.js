// The sessions page: a row per session (sub-agents under their parent), live from the feed.
"use strict";

(() => {
  const rows = new Map();  // key -> the daemon's session info (plus its newest live sample)
  const lastStop = new Map();  // key -> the one-line report of the last stop or kill sent from here
  const tbody = document.querySelector("#sessions tbody");
  const FIELDS = ["key", "agent", "state", "generation", "tokens", "tool_calls", "cpu", "memory", "processes", "age",
                  "parent", "report"];
  const LABELS = [...document.querySelectorAll("#sessions thead th")].map((th) => th.textContent);

  function cells(row) {
    const u = row.usage || {};
    const live = row.live && ds.LIVE.includes(row.state) ? row.live : null;
    return {
      key: row.key, agent: row.agent, state: row.state, generation: String(row.generation),
      tokens: String(Math.round(u.tokens || 0)), tool_calls: String(Math.round(u.tool_calls || 0)),
      cpu: `${(u.cpu_seconds || 0).toFixed(2)} s`,
      memory: live ? ds.bytes(live.memory_bytes) : (u.peak_memory_bytes ? `peak ${ds.bytes(u.peak_memory_bytes)}` : "–"),
      processes: live ? String(live.processes) : (ds.LIVE.includes(row.state) ? String(u.peak_processes || 0) : "0"),
      age: ds.age(Date.now() / 1000 - row.created_wall),
      parent: row.parent || "",
      report: lastStop.get(row.key) || (row.last_outcome ? row.last_outcome : ""),
    };
  }

  function makeRow(key) {
    const tr = ds.el("tr", { dataset: { session: key } });
    for (const field of FIELDS) {
      const label = LABELS[FIELDS.indexOf(field)];
      const td = ds.el(field === "key" ? "th" : "td", { dataset: { field, label }, scope: field === "key" ? "row" : null });
      if (["tokens", "tool_calls", "cpu", "memory", "processes", "age"].includes(field)) td.className = "num";
      if (field === "key") td.append(ds.el("a", { href: `/session?key=${encodeURIComponent(key)}` }));
      tr.append(td);
    }
    const acts = ds.el("td", { class: "acts", dataset: { field: "actions" } });
    if (ds.mayAct) acts.append(ds.el("div", { class: "buttons-row" }, ...ds.actionButtons(key, replied)));
    tr.append(acts);
    return tr;
  }

  function replied(verb, key, reply) {
    ds.feedback(ds.replyText(verb, key, reply), reply.ok);
    const result = reply.ok && reply.result;
    if (result && Array.isArray(result.reports)) {
      lastStop.set(key, result.already_ended ? "nothing was running" : result.reports.map(ds.reportLine).join("; "));
      const row = rows.get(key);
      if (row) paint(row);
    }
  }

  function paint(row) {
    let tr = tbody.querySelector(`tr[data-session="${CSS.escape(row.key)}"]`);
    if (!tr) tr = makeRow(row.key);
    const values = cells(row);
    for (const field of FIELDS) {
      const td = tr.querySelector(`[data-field="${field}"]`);
      const target = field === "key" ? td.firstChild : td;
      if (target.textContent !== values[field]) target.textContent = values[field];
    }
    tr.dataset.state = row.state;
    ds.syncButtons(tr, row.state);
    return tr;
  }

  // Tree order: roots oldest first, each followed by its sub-agents (indented by depth).
  function ordered() {
    const children = new Map();
    const roots = [];
    for (const row of rows.values()) {
      if (row.parent && rows.has(row.parent)) {
        if (!children.has(row.parent)) children.set(row.parent, []);
        children.get(row.parent).push(row);
      } else roots.push(row);
    }
    const byAge = (a, b) => a.created_wall - b.created_wall || a.key.localeCompare(b.key);
    const out = [];
    const walk = (row, depth) => {
      out.push([row, depth]);
      for (const child of (children.get(row.key) || []).sort(byAge)) walk(child, depth + 1);
    };
    roots.sort(byAge).forEach((r) => walk(r, 0));
    return out;
  }

  function visible(row) {
    const active = document.getElementById("f-active").checked;
    const tokens = parseFloat(document.getElementById("f-tokens").value);
    const agent = document.getElementById("f-agent").value;
    const ageMin = parseFloat(document.getElementById("f-age").value);
    if (active && !ds.LIVE.includes(row.state)) return false;
    if (!Number.isNaN(tokens) && (row.usage?.tokens || 0) < tokens) return false;
    if (agent && row.agent !== agent) return false;
    if (!Number.isNaN(ageMin) && Date.now() / 1000 - row.created_wall < ageMin * 60) return false;
    return true;
  }

  function render() {
    let shown = 0;
    for (const [row, depth] of ordered()) {
      const tr = paint(row);
      tr.style.setProperty("--depth", depth);
      tr.classList.toggle("child", depth > 0);
      tr.hidden = !visible(row);
      shown += tr.hidden ? 0 : 1;
      tbody.append(tr);  // moves it into tree order
    }
    for (const tr of [...tbody.children]) if (!rows.has(tr.dataset.session)) tr.remove();
    document.getElementById("count").textContent = `${shown} of ${rows.size} shown`;
    document.getElementById("empty").hidden = rows.size > 0;
    const select = document.getElementById("f-agent");
    const agents = [...new Set([...rows.values()].map((r) => r.agent))].sort();
    const have = [...select.options].slice(1).map((o) => o.value);
    if (agents.join() !== have.join()) {
      const keep = select.value;
      select.replaceChildren(ds.el("option", { value: "", text: "any" }),
                             ...agents.map((a) => ds.el("option", { value: a, text: a })));
      select.value = agents.includes(keep) ? keep : "";
    }
    const stopAll = document.getElementById("stop-all");
    stopAll.disabled = ![...rows.values()].some((r) => ds.LIVE.includes(r.state));
  }

  let pending = false;
  function soon() {  // many rows in one burst: one render
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; render(); });
  }

  ds.follow({
    snapshot: (all) => { rows.clear(); for (const r of all) rows.set(r.key, r); render(); },
    row: (r) => { rows.set(r.key, r); soon(); },
    remove: ({ key }) => { rows.delete(key); soon(); },
  });
  for (const id of ["f-active", "f-tokens", "f-agent", "f-age"]) {
    document.getElementById(id).addEventListener("input", render);
    document.getElementById(id).addEventListener("change", render);
  }
  setInterval(render, 15000);  // the age column only: no request is made

  const stopAll = document.getElementById("stop-all");
  const dialog = document.getElementById("confirm-stop-all");
  if (!ds.mayAct) {
    stopAll.remove();
  } else {
    stopAll.addEventListener("click", () => {
      const live = [...rows.values()].filter((r) => ds.LIVE.includes(r.state));
      document.getElementById("confirm-text").textContent =
        `${live.length} active session(s) and their sub-agents will be revoked and stopped: ` +
        live.map((r) => r.key).join(", ");
      dialog.showModal();
    });
    dialog.addEventListener("close", async () => {
      if (dialog.returnValue !== "stop") return;
      stopAll.disabled = true;
      const reply = await ds.stopAll();
      const lines = (reply.results || []).map((r) => ds.replyText("sessions.stop", r.key, r));
      ds.feedback(lines.length ? lines.join("\n") : (reply.message || "nothing was running"), reply.ok);
      for (const r of reply.results || []) {
        if (r.ok) replied("sessions.stop", r.key, r);
      }
      ds.feedback(lines.length ? lines.join("\n") : (reply.message || "nothing was running"), reply.ok);
    });
  }
  ds.logout();
})();
