// The Clearance inbox: plain JavaScript, no framework, no build step.
//
// It talks to the HTTP API's own routes (GET /approvals, GET /executions/{id},
// POST /executions/{id}/signal, POST /approvals/batch) with the session cookie set at
// sign-in, and to /inbox/api/* for the session and a tool's schema. Every state-changing
// request carries the session's X-CSRF-Token. Text from requests (parameters, reasons, a
// model's words) is only ever set as textContent, never parsed as HTML.
"use strict";

(() => {
  const ROOT = new URL("../", location.href); // where the API is mounted
  const INBOX = new URL("./", location.href);
  const POLL_MS = 2000;
  const CLOCK_SYNC_EVERY = 15; // polls
  const BATCH_MAX = 100; // requestIds in one POST /approvals/batch

  const state = {
    session: null, // {name, byKind, via, csrfToken, now}
    offset: 0, // the server's clock minus this browser's, in ms
    pending: [], // every pending request, soonest expiry first
    visible: [], // the pending ones the filters let through
    picked: new Set(), // request ids ticked for a batch
    selectedId: null,
    selectedIndex: 0,
    listKey: "",
    detail: null, // {request, execution, schema}
    detailKey: "", // requestId + status: the decision area is rebuilt when it changes
    form: null, // the modification form of the request shown
    schemas: new Map(), // executionId/tool -> schema answer, or null (none to be had)
    busy: false,
    notice: null, // {requestId, text}: what the page says after a vote of several
    polls: 0,
    timer: null,
    generation: 0, // bumped on sign-out: answers for an older session are dropped
  };

  const $ = (selector, root = document) => root.querySelector(selector);

  // -- DOM building: properties and text only ---------------------------------------------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (value === true) el.setAttribute(key, "");
      else el.setAttribute(key, String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function shown(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function canonical(value) {
    if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
    if (value && typeof value === "object") {
      return "{" + Object.keys(value).sort()
        .map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
    }
    return JSON.stringify(value);
  }

  const same = (a, b) => canonical(a) === canonical(b);

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toISOString().replace("T", " ").replace(/\.\d+Z$|Z$/, " UTC");
  }

  // -- the server ---------------------------------------------------------------------------

  async function call(method, url, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && state.session && state.session.csrfToken) {
      headers["X-CSRF-Token"] = state.session.csrfToken;
    }
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (err) {
      return { ok: false, status: 0, data: null, message: "the server cannot be reached" };
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    const error = data && data.error ? data.error : null;
    const message = error ? `${error.message} (${response.status} ${error.code})` : `HTTP ${response.status}`;
    return { ok: response.ok, status: response.status, data, error, message };
  }

  const api = (path) => new URL(path, ROOT);
  const inbox = (path) => new URL(path, INBOX);

  function sessionLost(answer) {
    // A read refused for its credential: the key was revoked, expired, or signed out elsewhere.
    return answer.status === 401 || (answer.status === 403 && answer.error && answer.error.code !== "not_granted");
  }

  // -- signing in and out -----------------------------------------------------------------

  function showSignIn(message) {
    state.generation += 1;
    state.session = null;
    clearTimeout(state.timer);
    $("#inbox").hidden = true;
    $("#who").hidden = true;
    $("#sign-in").hidden = false;
    $("#sign-in-error").textContent = message || "";
    $("#key").focus();
  }

  function signedIn(session) {
    state.session = session;
    state.offset = Date.parse(session.now) - Date.now();
    state.generation += 1;
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
    $("#sign-in").hidden = true;
    $("#inbox").hidden = false;
    $("#who").hidden = false;
    const name = $("#who-name");
    name.replaceChildren(session.name, " ", h("span", { class: "kind", text: `(${session.byKind}${session.via === "header" ? ", signed in by your proxy" : ""})` }));
    $("#sign-out").hidden = session.via !== "cookie";
    state.listKey = "";
    poll(state.generation);
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("#key");
    const key = input.value.trim();
    if (!key) {
      $("#sign-in-error").textContent = "Paste your key first.";
      return;
    }
    const answer = await call("POST", inbox("api/session"), { key });
    if (!answer.ok) {
      $("#sign-in-error").textContent = answer.message;
      return;
    }
    input.value = "";
    signedIn(answer.data);
  }

  async function signOut() {
    await call("DELETE", inbox("api/session"));
    state.pending = [];
    state.picked.clear();
    state.selectedId = null;
    state.detail = null;
    state.detailKey = "";
    $("#list").replaceChildren();
    $("#detail").replaceChildren(h("p", { class: "empty", text: "Select a request: click it, or press j / k." }));
    showSignIn("Signed out.");
  }

  async function syncClock() {
    const answer = await call("GET", inbox("api/session"));
    if (answer.ok) state.offset = Date.parse(answer.data.now) - Date.now();
    return answer;
  }

  // -- polling ------------------------------------------------------------------------------

  async function poll(generation) {
    clearTimeout(state.timer);
    if (generation !== state.generation) return;
    try {
      if (state.polls % CLOCK_SYNC_EVERY === CLOCK_SYNC_EVERY - 1) {
        const answer = await syncClock();
        if (!answer.ok && sessionLost(answer)) return showSignIn(answer.message);
      }
      state.polls += 1;
      await refresh(generation);
    } finally {
      if (generation === state.generation && state.session) {
        state.timer = setTimeout(() => poll(generation), POLL_MS);
      }
    }
  }

  async function refresh(generation) {
    const all = [];
    let after = null;
    for (let page = 0; page < 20; page += 1) {
      const url = api("approvals");
      url.searchParams.set("limit", "1000");
      if (after) url.searchParams.set("after", after);
      const answer = await call("GET", url);
      if (generation !== state.generation) return;
      if (!answer.ok) {
        if (sessionLost(answer)) return showSignIn(answer.message);
        $("#list-error").textContent = `Could not list the requests: ${answer.message}`;
        return;
      }
      all.push(...answer.data.approvals);
      after = answer.data.next;
      if (!after) break;
    }
    $("#list-error").textContent = "";
    all.sort((a, b) => Date.parse(a.expiresAt) - Date.parse(b.expiresAt) || a.requestId.localeCompare(b.requestId));
    state.pending = all;
    const ids = new Set(all.map((r) => r.requestId));
    for (const id of [...state.picked]) if (!ids.has(id)) state.picked.delete(id);
    renderList();
    if (state.selectedId) await loadDetail(state.selectedId, generation);
  }

  // -- the list -----------------------------------------------------------------------------

  function options(select, values, label) {
    const current = select.value;
    const wanted = [...new Set(values)].sort();
    if (current && !wanted.includes(current)) wanted.push(current);
    const have = [...select.options].slice(1).map((o) => o.value);
    if (same(have, wanted)) return;
    select.replaceChildren(h("option", { value: "", text: label }), ...wanted.map((v) => h("option", { value: v, text: v })));
    select.value = current;
  }

  function renderList() {
    const agentFilter = $("#filter-agent");
    const toolFilter = $("#filter-tool");
    options(agentFilter, state.pending.map((r) => r.agentTag), "all agents");
    const ofAgent = state.pending.filter((r) => !agentFilter.value || r.agentTag === agentFilter.value);
    options(toolFilter, ofAgent.map((r) => r.tool), "all tools");
    state.visible = ofAgent.filter((r) => !toolFilter.value || r.tool === toolFilter.value);
    const count = state.visible.length;
    $("#count").textContent = count === state.pending.length ? `${count} waiting` : `${count} of ${state.pending.length} waiting`;
    $("#empty").hidden = count > 0;
    const key = canonical([state.visible.map((r) => [r.requestId, (r.votes || []).length, r.callDigest, r.expiresAt]), [...state.picked].sort(), state.selectedId]);
    if (key !== state.listKey) {
      state.listKey = key;
      $("#list").replaceChildren(...state.visible.map(row));
    }
    const index = state.visible.findIndex((r) => r.requestId === state.selectedId);
    if (index >= 0) state.selectedIndex = index;
    $("#select-all").checked = count > 0 && state.visible.every((r) => state.picked.has(r.requestId));
    $("#batch-approve").disabled = state.picked.size === 0;
    $("#batch-reject").disabled = state.picked.size === 0;
    tick();
  }

  function summary(params) {
    return Object.entries(params || {}).map(([k, v]) => `${k}: ${shown(v)}`).join(" · ");
  }

  // -- quorums: who approved so far, who is still needed, who may not --------------------------

  const needsQuorum = (request) => typeof request.approvalsRequired === "number";

  function listOf(names) {
    return names.length < 2 ? names.join("") : `${names.slice(0, -1).join(", ")} and ${names[names.length - 1]}`;
  }

  // "1 of 2 approvals — alice; still needed: 1 from risk" ("" for a request one approval decides).
  function quorumText(request) {
    if (!needsQuorum(request)) return "";
    const required = request.approvalsRequired;
    const names = (request.votes || []).map((v) => v.by);
    let text = `${names.length} of ${required} approval${required === 1 ? "" : "s"}`;
    if (names.length) text += ` — ${names.join(", ")}`;
    const needed = request.stillNeeded;
    if (request.status !== "pending" || !needed) return text;
    const groups = needed.groups || [];
    if (!groups.length) return `${text}; still needed: ${needed.approvals}`;
    if (needed.approvals === 1 && groups.length === 1) return `${text}; still needed: 1 from ${groups[0]}`;
    const each = groups.length === 1 ? `one from ${groups[0]}` : `one from each of ${listOf(groups)}`;
    return `${text}; still needed: ${needed.approvals}, ${each}`;
  }

  // Why the signed-in reviewer may not approve this request, if they may not ("" if they may).
  function cannotApprove(request) {
    const me = state.session ? state.session.name : null;
    if (!me || request.status !== "pending") return "";
    if (request.requestedBy && request.requestedBy === me) return "You started this run: another person must approve it.";
    if ((request.votes || []).some((v) => v.by === me)) return "You approved it already: it waits for the others still needed.";
    return "";
  }

  // The call a pending request asks about now: a voter's changes included.
  function currentParameters(request) {
    return { ...(request.parameters || {}), ...(request.modifiedParams || {}) };
  }

  function row(request) {
    const id = request.requestId;
    const box = h("input", {
      type: "checkbox",
      class: "pick",
      "aria-label": `select ${id}`,
      onclick: (event) => event.stopPropagation(),
      onchange: (event) => togglePick(id, event.target.checked),
    });
    box.checked = state.picked.has(id);
    const classes = [state.picked.has(id) ? "picked" : "", id === state.selectedId ? "current" : ""].join(" ").trim();
    return h(
      "li",
      { class: classes || null, dataset: { id }, "aria-current": id === state.selectedId ? "true" : null, onclick: () => select(id) },
      box,
      h("div", { class: "what" },
        h("span", { class: "tool", text: request.tool }),
        h("span", { class: "agent", text: request.agentTag }),
        h("div", { class: "params", text: summary(currentParameters(request)) }),
        needsQuorum(request) ? h("div", { class: "quorum", text: quorumText(request) }) : null),
      h("span", { class: "countdown", dataset: { expires: request.expiresAt } }),
    );
  }

  function togglePick(id, on) {
    if (on === undefined) on = !state.picked.has(id);
    if (on) state.picked.add(id);
    else state.picked.delete(id);
    renderList();
  }

  // -- the countdown ------------------------------------------------------------------------

  function remaining(iso) {
    return Date.parse(iso) - (Date.now() + state.offset);
  }

  function left(ms) {
    if (ms <= 0) return "expired";
    const s = Math.floor(ms / 1000);
    const hours = Math.floor(s / 3600);
    const minutes = Math.floor((s % 3600) / 60);
    const seconds = String(s % 60).padStart(2, "0");
    if (hours >= 24) return `${Math.floor(hours / 24)}d ${hours % 24}h left`;
    if (hours) return `${hours}h ${String(minutes).padStart(2, "0")}m left`;
    return `${minutes}:${seconds} left`;
  }

  function tick() {
    for (const el of document.querySelectorAll(".countdown[data-expires]")) {
      const ms = remaining(el.dataset.expires);
      el.textContent = left(ms);
      el.classList.toggle("soon", ms > 0 && ms < 60000);
      el.classList.toggle("gone", ms <= 0);
    }
    const note = $("#expired-note");
    if (note && state.detail && state.detail.request.status === "pending") {
      const gone = remaining(state.detail.request.expiresAt) <= 0;
      note.hidden = !gone;
      for (const button of document.querySelectorAll("#decide button")) {
        if (gone) button.disabled = true;
      }
      if (!gone) updateButtons();
    }
  }

  // -- the detail ---------------------------------------------------------------------------

  function select(id) {
    if (!id) return;
    state.selectedId = id;
    const index = state.visible.findIndex((r) => r.requestId === id);
    if (index >= 0) state.selectedIndex = index;
    renderList();
    const el = $(`#list li[data-id="${CSS.escape(id)}"]`);
    if (el) el.scrollIntoView({ block: "nearest" });
    const listed = state.pending.find((r) => r.requestId === id);
    if (!state.detail || state.detail.request.requestId !== id) {
      state.detail = null;
      state.notice = null;
      state.detailKey = "";
      state.form = null;
      const detail = $("#detail");
      detail.replaceChildren(h("p", { class: "empty", text: listed ? `Loading ${listed.tool} ${id}…` : "Loading…" }));
    }
    loadDetail(id, state.generation);
  }

  function move(step) {
    if (!state.visible.length) return;
    let index = state.visible.findIndex((r) => r.requestId === state.selectedId);
    if (index < 0) {
      // The one shown was decided and left the list: start from where it was.
      index = Math.min(state.selectedIndex, state.visible.length - 1);
      if (step > 0) index -= 1;
      index = Math.max(-1, index);
      select(state.visible[Math.max(0, Math.min(state.visible.length - 1, index + step))].requestId);
      return;
    }
    select(state.visible[Math.max(0, Math.min(state.visible.length - 1, index + step))].requestId);
  }

  async function loadDetail(id, generation) {
    const listed = state.pending.find((r) => r.requestId === id);
    const executionId = listed ? listed.executionId : state.detail && state.detail.request.requestId === id ? state.detail.request.executionId : null;
    if (!executionId) return;
    const answer = await call("GET", api(`executions/${encodeURIComponent(executionId)}`));
    if (generation !== state.generation || state.selectedId !== id) return;
    if (!answer.ok) {
      if (sessionLost(answer)) return showSignIn(answer.message);
      $("#detail").replaceChildren(h("p", { class: "error", text: `Could not load ${id}: ${answer.message}` }));
      return;
    }
    const execution = answer.data;
    const request = execution.approvals.find((r) => r.requestId === id);
    if (!request) return;
    const schema = await schemaOf(executionId, request.tool);
    if (generation !== state.generation || state.selectedId !== id) return;
    state.detail = { request, execution, schema };
    renderDetail();
  }

  async function schemaOf(executionId, tool) {
    const key = `${executionId}/${tool}`;
    if (state.schemas.has(key)) return state.schemas.get(key);
    const answer = await call("GET", inbox(`api/executions/${encodeURIComponent(executionId)}/tools/${encodeURIComponent(tool)}`));
    const found = answer.ok ? answer.data : null;
    if (answer.ok || answer.status === 404) state.schemas.set(key, found);
    return found;
  }

  function renderDetail() {
    const { request, execution, schema } = state.detail;
    const detail = $("#detail");
    // Rebuilt when the request changes: decided, a vote counted, a deadline moved.
    const key = canonical([request.requestId, request.status, request.votes || [], request.callDigest, request.expiresAt]);
    if (key !== state.detailKey) {
      state.detailKey = key;
      const pending = request.status === "pending";
      if (!pending) state.form = null;
      const changed = request.modifiedParams || {};
      // Through h(), which leaves out the parts a request does not have (replaceChildren
      // would show a null as the text "null").
      detail.replaceChildren(...h("div", {},
        h("div", { class: "detail-head" },
          h("h2", { text: request.tool }),
          h("span", { class: "agent", text: `agent ${request.agentTag}` }),
          h("span", { id: "status", class: `status ${request.status}`, text: request.status.replace("_", " ") }),
          pending ? h("span", { class: "countdown", dataset: { expires: request.expiresAt } }) : null),
        h("p", { class: "ids mono", text: `${request.requestId} · ${request.executionId} · asked ${when(request.timestamp)} · expires ${when(request.expiresAt)}` }),
        h("h3", { text: "Why it needs approval" }),
        h("p", { class: "reason-text", text: request.reason || "(no reason given)" }),
        request.policy ? h("p", { class: "policy-rule", text: `Asked by policy rule ${request.policy.ruleId}${request.policy.reason ? `: ${request.policy.reason}` : ""}` }) : null,
        needsQuorum(request) ? h("p", { id: "quorum", class: "quorum", text: quorumText(request) }) : null,
        request.requestedBy ? h("p", { id: "requester", class: "requester", text: `Requested by ${request.requestedBy}, who may not approve it.` }) : null,
        request.timeoutAction === "approve" && pending ? h("p", { class: "timeout-action", text: "If nobody decides before it expires, it is approved." }) : null,
        pending && state.notice && state.notice.requestId === request.requestId ? h("p", { id: "notice", class: "notice", role: "status", text: state.notice.text }) : null,
        h("h3", { text: "Parameters" }),
        h("table", { class: "params" }, h("tbody", {}, Object.entries(request.parameters || {}).map(([k, v]) => {
          const modified = Object.prototype.hasOwnProperty.call(changed, k) && !same(changed[k], v);
          return h("tr", {}, h("th", { text: k }), h("td", { class: modified ? "changed" : null, text: modified ? `${shown(v)} → ${shown(changed[k])}` : shown(v) }));
        }))),
        pending ? decideArea(request, schema) : outcome(request),
        h("p", { id: "detail-error", class: "error", role: "alert" }),
        h("h3", { text: "History" }),
        h("ol", { id: "history" }),
      ).childNodes);
    }
    renderHistory(execution);
    tick();
  }

  function outcome(request) {
    const by = request.decidedBy ? `${request.decidedBy} (${request.decidedByKind || "unknown"})` : "nobody named";
    const lines = [];
    if (request.outcome === "allowed_by_policy" || request.outcome === "denied_by_policy") {
      // Decided by the policy of the agent's new definition (a redeploy), not a person.
      const verb = request.outcome === "allowed_by_policy" ? "Allowed" : "Denied";
      lines.push(h("p", { text: `${verb} by the agent's policy when it was defined again, at ${when(request.decidedAt)}; nobody decided it.` }));
      if (request.rejectionReason) lines.push(h("p", { text: `Reason: ${request.rejectionReason}` }));
    } else if (request.status === "invalidated") {
      lines.push(h("p", { text: `Withdrawn at ${when(request.decidedAt)}: the agent was defined again and ${request.rejectionReason}. The agent was told; the tool did not run.` }));
    } else if (request.outcome === "approved_by_timeout") {
      lines.push(h("p", { text: `Approved at ${when(request.decidedAt)}: nobody decided in time, and the tool is defined to be approved then.` }));
    } else if (request.status === "approved") {
      lines.push(h("p", { text: `Approved by ${by} at ${when(request.decidedAt)}.` }));
      if (needsQuorum(request)) lines.push(h("p", { class: "quorum", text: quorumText(request) }));
      if (request.modifiedParams) lines.push(h("p", { text: `With changes: ${summary(request.modifiedParams)}` }));
    } else if (request.status === "rejected") {
      lines.push(h("p", { text: `Rejected by ${by} at ${when(request.decidedAt)}.` }));
      lines.push(h("p", { text: `Reason: ${request.rejectionReason || "(none given)"}` }));
    } else if (request.status === "timed_out") {
      lines.push(h("p", { text: `Timed out: nobody decided before ${when(request.expiresAt)}; the agent was told it was not approved.` }));
    } else {
      lines.push(h("p", { text: `${request.status.replace("_", " ")} ${request.decidedBy ? "by " + by : ""} at ${when(request.decidedAt)}.` }));
      if (request.rejectionReason) lines.push(h("p", { text: `Reason: ${request.rejectionReason}` }));
    }
    return h("div", { id: "outcome", class: `outcome ${request.status}` }, lines);
  }

  function eventLine(e) {
    const who = e.by ? ` by ${e.by} (${e.byKind || "unknown"})` : "";
    switch (e.type) {
      case "started": return ["started", `input: ${shown(e.input)}`];
      case "model_replied": {
        const words = (e.content || []).filter((b) => b.type === "text").map((b) => b.text).join(" ");
        const asks = (e.content || []).filter((b) => b.type === "tool_use").map((b) => `${b.name}(${summary(b.input)})`);
        return ["model", [words, asks.length ? `asks for ${asks.join(", ")}` : ""].filter(Boolean).join(" — ")];
      }
      case "model_failed": return ["model failed", shown(e.error)];
      case "approved": return ["approved", `${e.requestId}${who}${e.modifiedParams ? `, changed ${summary(e.modifiedParams)}` : ""}`];
      case "rejected": return ["rejected", `${e.requestId}${who}${e.reason ? `: ${e.reason}` : ""}`];
      case "timer_fired": return ["timed out", `${e.requestId || ""} expired without a decision`];
      case "extended": return ["extended", `${e.requestId} until ${when(e.until)}${who}`];
      case "stop_requested": return ["stop", `${who.trim()}${e.reason ? `: ${e.reason}` : ""}`];
      case "tool_finished": return ["tool ran", shown(e.output)];
      case "tool_failed": return ["tool failed", shown(e.error)];
      default: return [e.type, ""];
    }
  }

  function renderHistory(execution) {
    const decisions = new Set(["approved", "rejected", "timer_fired", "stop_requested", "extended"]);
    // An approval that was one vote towards a quorum, not the one that decided it.
    const votes = new Set();
    for (const r of execution.approvals || []) {
      for (const v of r.votes || []) {
        if (!(r.status === "approved" && r.decidedBy === v.by && r.decidedAt === v.at)) votes.add(`${r.requestId}/${v.by}/${v.at}`);
      }
    }
    $("#history").replaceChildren(...execution.events.map((e) => {
      let [kind, text] = eventLine(e);
      if (e.type === "approved" && votes.has(`${e.requestId}/${e.by}/${e.at}`)) kind = "vote";
      return h("li", { class: decisions.has(e.type) ? "decision" : null, dataset: { type: e.type } },
        h("span", { class: "at", text: when(e.at) }),
        h("span", {}, h("span", { class: "kind", text: kind }), " ", text));
    }));
  }

  // -- the decision form --------------------------------------------------------------------

  function decideArea(request, schemaAnswer) {
    const form = modificationForm(request, schemaAnswer);
    state.form = form;
    const reason = h("input", {
      id: "reject-reason",
      type: "text",
      placeholder: "Reason for rejecting",
      "aria-label": "Reason for rejecting",
      onkeydown: (event) => {
        if (event.key === "Enter") {
          event.preventDefault();
          decide("reject");
        }
      },
    });
    return h("div", { id: "decide" },
      h("h3", { text: "Parameters to approve" }),
      form.element,
      h("p", { id: "expired-note", class: "expired-note", hidden: true, text: "This request has expired: its timeout is being recorded, and it can no longer be decided." }),
      cannotApprove(request) ? h("p", { id: "cannot-approve", class: "expired-note", text: cannotApprove(request) }) : null,
      h("div", { class: "actions" },
        h("button", { id: "approve", type: "button", class: "approve", onclick: () => decide("approve") }, "Approve"),
        h("button", { id: "approve-changes", type: "button", class: "approve outline", onclick: () => decide("approve-changes") }, "Approve with changes"),
        h("button", { id: "reset", type: "button", class: "quiet", onclick: () => { form.reset(); updateButtons(); } }, "reset"),
        h("span", { class: "reject-group" },
          reason,
          h("button", { id: "reject", type: "button", class: "reject", onclick: () => decide("reject") }, "Reject"))),
      request.extendableUntil ? extendArea(request) : null);
  }

  // More time for the request: only where the server says it may be extended
  // (extendableUntil: its tool's max_approval_timeout from when it was asked). The time
  // is UTC, like every time on this page; the server reads the text with the same rule
  // as the CLI's --until, and its refusal (too late, not later) is shown as it says it.
  function extendArea(request) {
    const input = h("input", {
      id: "extend-until",
      type: "datetime-local",
      step: 1,
      "aria-label": "New deadline, UTC",
      onkeydown: (event) => {
        if (event.key === "Enter") {
          event.preventDefault();
          extend();
        }
      },
    });
    input.value = request.extendableUntil.replace(/(\.\d+)?Z$/, ""); // the most it may have
    return h("div", { id: "extend", class: "extend" },
      h("label", { for: "extend-until", text: "New deadline (UTC)" }),
      input,
      h("button", { id: "extend-button", type: "button", onclick: extend }, "Extend"),
      h("span", { class: "hint", text: `at most ${when(request.extendableUntil)}` }));
  }

  async function extend() {
    if (!state.detail || state.detail.request.status !== "pending" || state.busy) return;
    const request = state.detail.request;
    const input = $("#extend-until");
    clearProblems();
    if (!input || !input.value) {
      $("#detail-error").textContent = "Choose the new deadline first.";
      if (input) input.focus();
      return;
    }
    state.busy = true;
    updateButtons();
    const generation = state.generation;
    const payload = { requestId: request.requestId, until: `${input.value}Z` };
    const answer = await call("POST", api(`executions/${encodeURIComponent(request.executionId)}/signal`), { signal: "extend", payload });
    state.busy = false;
    if (generation !== state.generation) return;
    if (!answer.ok) {
      const error = $("#detail-error");
      if (error) error.textContent = `Not extended: ${answer.message}`;
      updateButtons();
      if (answer.status === 401 || (answer.status === 403 && answer.error && answer.error.code === "forbidden")) {
        return showSignIn(answer.message);
      }
      if (answer.status === 409 || answer.status === 410) await refresh(generation);
      return;
    }
    state.notice = { requestId: request.requestId, text: `Extended: it now expires at ${when(answer.data.expiresAt)}.` };
    await refresh(generation);
  }

  function updateButtons() {
    if (!state.form) return;
    const changed = state.form.changed();
    const approve = $("#approve");
    if (!approve) return;
    const gone = state.detail && remaining(state.detail.request.expiresAt) <= 0;
    const barred = state.detail && cannotApprove(state.detail.request) !== "";
    approve.disabled = state.busy || changed || gone || barred;
    $("#approve-changes").disabled = state.busy || !changed || gone || barred;
    $("#reject").disabled = state.busy || gone;
    const more = $("#extend-button");
    if (more) more.disabled = state.busy || gone;
    approve.title = changed ? "You changed parameters: approve with changes, or reset them" : "";
  }

  function typesOf(schema) {
    if (!schema || typeof schema !== "object") return [];
    if (typeof schema.type === "string") return [schema.type];
    if (Array.isArray(schema.type)) return schema.type.filter((t) => typeof t === "string");
    return [];
  }

  function isType(value, type) {
    switch (type) {
      case "string": return typeof value === "string";
      case "number": return typeof value === "number" && Number.isFinite(value);
      case "integer": return typeof value === "number" && Number.isInteger(value);
      case "boolean": return typeof value === "boolean";
      case "null": return value === null;
      case "array": return Array.isArray(value);
      case "object": return value !== null && typeof value === "object" && !Array.isArray(value);
      default: return true;
    }
  }

  const NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;
  const ABSENT = Symbol("absent");

  // One field of the form: its input, how to read it back, and where its problems go.
  function field(name, schema, original, required) {
    const has = original !== ABSENT;
    const types = typesOf(schema);
    const id = `field-${name}`;
    const error = h("div", { class: "field-error", dataset: { errorFor: name } });
    let input;
    let read; // () => value | ABSENT, or throws Error(problem)
    if (Array.isArray(schema && schema.enum)) {
      const values = schema.enum;
      input = h("select", { id, name },
        h("option", { value: "", text: required ? "— choose —" : "(not set)" }),
        values.map((v, i) => h("option", { value: String(i), text: shown(v) })));
      input.value = has ? String(values.findIndex((v) => same(v, original))) : "";
      read = () => (input.value === "" ? ABSENT : values[Number(input.value)]);
    } else if (types.length === 1 && types[0] === "boolean") {
      input = h("select", { id, name },
        h("option", { value: "", text: "(not set)" }),
        h("option", { value: "true", text: "true" }),
        h("option", { value: "false", text: "false" }));
      input.value = has ? String(original) : "";
      read = () => (input.value === "" ? ABSENT : input.value === "true");
    } else if (types.length === 1 && (types[0] === "number" || types[0] === "integer")) {
      input = h("input", { id, name, type: "text", inputmode: "decimal", autocomplete: "off" });
      input.value = has ? shown(original) : "";
      read = () => {
        const text = input.value.trim();
        if (text === "") return ABSENT;
        if (!NUMBER.test(text)) throw new Error(types[0] === "integer" ? "must be a whole number" : "must be a number");
        const value = Number(text);
        if (types[0] === "integer" && !Number.isInteger(value)) throw new Error("must be a whole number");
        return value;
      };
    } else if (types.length === 1 && types[0] === "string") {
      const long = has && typeof original === "string" && (original.length > 80 || original.includes("\n"));
      input = long ? h("textarea", { id, name, rows: 3 }) : h("input", { id, name, type: "text", autocomplete: "off" });
      input.value = has ? original : "";
      read = () => (input.value === "" && !has ? ABSENT : input.value);
    } else {
      input = h("textarea", { id, name, rows: 3, spellcheck: "false" });
      input.value = has ? JSON.stringify(original, null, 2) : "";
      read = () => {
        const text = input.value.trim();
        if (text === "") return ABSENT;
        try {
          return JSON.parse(text);
        } catch (err) {
          throw new Error("is not valid JSON");
        }
      };
    }
    const hint = schema && schema.description ? h("div", { class: "hint", text: schema.description }) : null;
    const label = h("label", { for: id }, name, required ? h("span", { class: "required", text: " *" }) : null,
      types.length ? h("div", { class: "hint", text: types.join(" | ") }) : null);
    return {
      name,
      original,
      input,
      error,
      row: [label, h("div", { class: "field" }, input, hint, error)],
      // The value, or ABSENT; problems are thrown as Error(text).
      value() {
        const value = read();
        if (value === ABSENT) {
          if (has) throw new Error("cannot be removed: a reviewer changes values, not which parameters there are");
          if (required) throw new Error("is required");
          return ABSENT;
        }
        if (types.length && !types.some((t) => isType(value, t))) throw new Error(`must be ${types.join(" or ")}`);
        if (Array.isArray(schema && schema.enum) && !schema.enum.some((v) => same(v, value))) {
          throw new Error(`must be one of ${schema.enum.map(shown).join(", ")}`);
        }
        return value;
      },
      reset() {
        if (input.tagName === "SELECT") {
          if (Array.isArray(schema && schema.enum)) input.value = has ? String(schema.enum.findIndex((v) => same(v, original))) : "";
          else input.value = has ? String(original) : "";
        } else if (types.length === 1 && types[0] === "string") input.value = has ? original : "";
        else if (input.tagName === "TEXTAREA") input.value = has ? JSON.stringify(original, null, 2) : "";
        else input.value = has ? shown(original) : "";
      },
    };
  }

  function formable(schema) {
    if (!schema || typeof schema !== "object") return false;
    if (schema.type !== undefined && schema.type !== "object") return false;
    if (!schema.properties || typeof schema.properties !== "object" || Array.isArray(schema.properties)) return false;
    return !["oneOf", "anyOf", "allOf", "if", "not", "$ref", "dependentSchemas", "patternProperties"].some((k) => k in schema);
  }

  // The form that edits a request's parameters: one field per parameter from the tool's
  // schema, or, when there is no schema to be had (or one the form cannot show), the
  // parameters as one JSON text.
  function modificationForm(request, schemaAnswer) {
    const params = currentParameters(request);
    const schema = schemaAnswer ? schemaAnswer.inputSchema : null;
    const general = h("div", { class: "field-error", dataset: { errorFor: "" } });
    const onInput = () => {
      clearProblems();
      updateButtons();
    };
    if (formable(schema)) {
      const required = new Set(Array.isArray(schema.required) ? schema.required : []);
      const names = [...Object.keys(schema.properties), ...Object.keys(params).filter((k) => !(k in schema.properties))];
      const fields = names.map((name) => field(
        name,
        schema.properties[name] || {},
        Object.prototype.hasOwnProperty.call(params, name) ? params[name] : ABSENT,
        required.has(name),
      ));
      const element = h("div", { class: "fields", oninput: onInput, onchange: onInput }, fields.map((f) => f.row), h("span"), general);
      const byName = new Map(fields.map((f) => [f.name, f]));
      return {
        element,
        raw: false,
        reset: () => { fields.forEach((f) => f.reset()); clearProblems(); },
        // {changes, problems: [[fieldName | "", text]]}
        read() {
          const changes = {};
          const problems = [];
          for (const f of fields) {
            try {
              const value = f.value();
              if (value !== ABSENT && (f.original === ABSENT || !same(value, f.original))) changes[f.name] = value;
            } catch (err) {
              problems.push([f.name, err.message]);
            }
          }
          return { changes, problems };
        },
        changed() {
          const { changes, problems } = this.read();
          return problems.length > 0 || Object.keys(changes).length > 0;
        },
        show(problems) {
          for (const [name, text] of problems) {
            const f = byName.get(name);
            const target = f ? f.error : general;
            target.textContent = target.textContent ? `${target.textContent}\n${name && !f ? name + ": " : ""}${text}` : `${name && !f ? name + ": " : ""}${text}`;
            if (f) f.input.classList.add("invalid");
          }
        },
        fieldOf(problem) {
          const match = /^([^.:[\]]+)[.:[]/.exec(problem);
          if (match && byName.has(match[1])) {
            const rest = problem.slice(match[1].length);
            return [match[1], rest.startsWith(": ") ? rest.slice(2) : rest];
          }
          const missing = /'([^']+)' is a required property/.exec(problem);
          if (missing && byName.has(missing[1])) return [missing[1], "is required"];
          return ["", problem];
        },
      };
    }
    const text = h("textarea", { id: "field-raw", name: "raw", rows: 8, spellcheck: "false" });
    text.value = JSON.stringify(params, null, 2);
    const why = schemaAnswer ? "This tool's schema is beyond the form: edit the parameters as JSON." : "No schema for this tool here: edit the parameters as JSON.";
    const element = h("div", { class: "raw", oninput: onInput },
      h("p", { class: "raw-note", text: why }), text, general);
    return {
      element,
      raw: true,
      reset: () => { text.value = JSON.stringify(params, null, 2); clearProblems(); },
      read() {
        let value;
        try {
          value = JSON.parse(text.value);
        } catch (err) {
          return { changes: {}, problems: [["", "the parameters are not valid JSON"]] };
        }
        if (!value || typeof value !== "object" || Array.isArray(value)) {
          return { changes: {}, problems: [["", "the parameters must be a JSON object"]] };
        }
        const removed = Object.keys(params).filter((k) => !(k in value));
        if (removed.length) return { changes: {}, problems: [["", `cannot remove ${removed.join(", ")}: a reviewer changes values, not which parameters there are`]] };
        const changes = {};
        for (const [k, v] of Object.entries(value)) if (!same(v, params[k])) changes[k] = v;
        return { changes, problems: [] };
      },
      changed() {
        const { changes, problems } = this.read();
        return problems.length > 0 || Object.keys(changes).length > 0;
      },
      show(problems) {
        general.textContent = problems.map(([, t]) => t).join("\n");
        text.classList.add("invalid");
      },
      fieldOf: (problem) => ["", problem],
    };
  }

  function clearProblems() {
    for (const el of document.querySelectorAll("#decide .field-error")) el.textContent = "";
    for (const el of document.querySelectorAll("#decide .invalid")) el.classList.remove("invalid");
    const error = $("#detail-error");
    if (error) error.textContent = "";
  }

  async function decide(how) {
    if (!state.detail || state.detail.request.status !== "pending" || state.busy) return;
    const request = state.detail.request;
    const form = state.form;
    clearProblems();
    if (how !== "reject" && cannotApprove(request)) {
      $("#detail-error").textContent = cannotApprove(request);
      return;
    }
    // The call this page shows: a decision for any other call is refused (stale_decision).
    const payload = { requestId: request.requestId };
    if (request.callDigest) payload.callDigest = request.callDigest;
    let signal = "approve";
    if (how === "reject") {
      const reason = $("#reject-reason").value.trim();
      if (!reason) {
        $("#detail-error").textContent = "Say why you reject it: the agent is told the reason.";
        $("#reject-reason").focus();
        return;
      }
      signal = "reject";
      payload.reason = reason;
    } else if (how === "approve-changes") {
      const { changes, problems } = form.read();
      if (problems.length) return form.show(problems);
      if (!Object.keys(changes).length) {
        $("#detail-error").textContent = "Nothing was changed: use Approve.";
        return;
      }
      payload.modifiedParams = changes;
    }
    state.busy = true;
    updateButtons();
    const generation = state.generation;
    const answer = await call("POST", api(`executions/${encodeURIComponent(request.executionId)}/signal`), { signal, payload });
    state.busy = false;
    if (generation !== state.generation) return;
    if (!answer.ok) {
      if (answer.status === 422 && answer.error && Array.isArray(answer.error.problems)) {
        form.show(answer.error.problems.map((p) => form.fieldOf(p)));
      }
      const error = $("#detail-error");
      if (error) error.textContent = `Not decided: ${answer.message}`;
      updateButtons();
      if ([401].includes(answer.status) || (answer.status === 403 && answer.error && answer.error.code === "forbidden")) {
        return showSignIn(answer.message);
      }
      if (answer.status === 409 || answer.status === 410) await refresh(generation);
      return;
    }
    if (answer.data && answer.data.decision === "pending" && signal === "approve") {
      // One vote of several: the request stays open for the others still needed.
      state.notice = { requestId: request.requestId, text: `Your approval is counted; still pending: ${quorumText({ ...answer.data, status: "pending" })}.` };
    }
    await refresh(generation);
  }

  // -- batches ------------------------------------------------------------------------------

  async function batch(approved) {
    const ids = state.pending.map((r) => r.requestId).filter((id) => state.picked.has(id));
    if (!ids.length) return;
    const reason = $("#batch-reason").value.trim();
    if (!approved && !reason) {
      $("#list-error").textContent = "Give one reason for rejecting the selected requests.";
      $("#batch-reason").focus();
      return;
    }
    $("#list-error").textContent = "";
    const generation = state.generation;
    const lines = [];
    for (let i = 0; i < ids.length; i += BATCH_MAX) {
      const body = { requestIds: ids.slice(i, i + BATCH_MAX), approved };
      if (!approved) body.reason = reason;
      const answer = await call("POST", api("approvals/batch"), body);
      if (generation !== state.generation) return;
      if (!answer.ok) {
        lines.push(h("li", { class: "refused", text: `The batch was refused: ${answer.message}` }));
        break;
      }
      for (const result of answer.data.results) {
        if (result.ok && result.decision === "pending") {
          state.picked.delete(result.requestId);
          lines.push(h("li", { class: "ok", dataset: { id: result.requestId }, text: `${result.requestId} (${result.tool}): your approval is counted; still pending: ${quorumText({ ...result, status: "pending" })}` }));
        } else if (result.ok) {
          state.picked.delete(result.requestId);
          lines.push(h("li", { class: "ok", dataset: { id: result.requestId }, text: `${result.requestId} (${result.tool}): ${result.decision} by ${result.by}` }));
        } else {
          lines.push(h("li", { class: "refused", dataset: { id: result.requestId }, text: `${result.requestId}: not decided: ${result.error.message} (${result.error.code})` }));
        }
      }
    }
    const box = $("#batch-results");
    $("ul", box).replaceChildren(...lines);
    box.hidden = false;
    if (!approved) $("#batch-reason").value = "";
    await refresh(generation);
  }

  // -- the keyboard -------------------------------------------------------------------------

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || !state.session) return;
    const target = event.target;
    const typing = target instanceof HTMLElement && (target.matches("textarea, select, input:not([type=checkbox])") || target.isContentEditable);
    if (typing) {
      if (event.key === "Escape") target.blur();
      return;
    }
    const pending = state.detail && state.detail.request.status === "pending";
    switch (event.key) {
      case "j": move(1); break;
      case "k": move(-1); break;
      case "x":
        if (state.selectedId && state.pending.some((r) => r.requestId === state.selectedId)) togglePick(state.selectedId);
        break;
      case "a":
        if (pending && state.form) decide(state.form.changed() ? "approve-changes" : "approve");
        break;
      case "r":
        if (pending && $("#reject-reason")) $("#reject-reason").focus();
        break;
      default: return;
    }
    event.preventDefault();
  }

  // -- start ---------------------------------------------------------------------------------

  async function start() {
    $("#sign-in-form").addEventListener("submit", signIn);
    $("#sign-out").addEventListener("click", signOut);
    $("#filter-agent").addEventListener("change", () => { state.listKey = ""; renderList(); });
    $("#filter-tool").addEventListener("change", () => { state.listKey = ""; renderList(); });
    $("#select-all").addEventListener("change", (event) => {
      for (const r of state.visible) {
        if (event.target.checked) state.picked.add(r.requestId);
        else state.picked.delete(r.requestId);
      }
      renderList();
    });
    $("#batch-approve").addEventListener("click", () => batch(true));
    $("#batch-reject").addEventListener("click", () => batch(false));
    $("#batch-dismiss").addEventListener("click", () => { $("#batch-results").hidden = true; });
    document.addEventListener("keydown", onKey);
    setInterval(tick, 1000);
    const answer = await call("GET", inbox("api/session"));
    if (answer.ok) signedIn(answer.data);
    else showSignIn(answer.status === 401 ? "" : answer.message);
  }

  start();
})();
