// Nexus human review: a live list of pending approvals and questions.
//
// The server pushes a snapshot and then "added"/"removed" events over a WebSocket; decisions go
// through the JSON API. Every piece of request data is put in the page with textContent (never
// innerHTML), so a diff or description full of HTML is shown as the text it is.
"use strict";

(() => {
  const cards = new Map(); // request_id -> {card, element, receivedLocal, serverOffset}
  const lists = {};
  let retryDelay = 500;

  // -- small DOM helpers ------------------------------------------------------------------------

  function el(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = String(text);
    return element;
  }

  function button(label, className, onClick) {
    const b = el("button", className, label);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function formatDuration(totalSeconds) {
    const s = Math.max(0, Math.floor(totalSeconds));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  let toastTimer = null;
  function toast(message) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // -- diff ---------------------------------------------------------------------------------------

  // Classify unified-diff lines: file headers only before the first hunk, so a deleted line that
  // itself starts with "--" is still shown as a deletion.
  function diffView(diff) {
    const box = el("pre", "diff");
    box.tabIndex = 0; // scrollable with the keyboard
    // Long lines wrap (hitl.css): every character stays in view, however long the line.
    const body = el("div", "diff-lines");
    box.append(body);
    const lines = diff.split("\n");
    if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
    let inHunk = false;
    for (const line of lines) {
      let kind = "ctx";
      if (line.startsWith("@@")) {
        kind = "hunk";
        inHunk = true;
      } else if (!inHunk && /^(---|\+\+\+|diff |index )/.test(line)) {
        kind = "file";
      } else if (line.startsWith("+")) {
        kind = "add";
      } else if (line.startsWith("-")) {
        kind = "del";
      }
      body.append(el("span", `line ${kind}`, line));
    }
    if (!diff) body.append(el("span", "line ctx", "(empty diff)"));
    return box;
  }

  // -- cards ----------------------------------------------------------------------------------------

  function header(card, title) {
    const head = el("header", "card-head");
    head.append(title, el("span", "timing"));
    return head;
  }

  // Only links to web pages: a URL in a card never becomes javascript: or data:.
  function safeUrl(value) {
    return typeof value === "string" && /^https?:\/\//i.test(value) ? value : null;
  }

  function meta(card) {
    const line = el("p", "meta");
    line.append("from agent ", el("strong", "agent", card.agent_id), " on ", el("strong", "instance", card.instance));
    const url = safeUrl(card.task_url);
    if (url) {
      const link = el("a", "task-link", "open the task");
      link.href = url;
      line.append(" · ", link);
    }
    return line;
  }

  // The questions the task asked before this change, and the answers it was built on.
  function answeredView(answered) {
    const box = el("section", "answered");
    box.append(el("h3", "answered-title", "Asked before this change"));
    for (const item of answered) {
      const entry = el("div", "answered-item");
      entry.append(el("p", "answered-question", item.question));
      const answer = el("p", "answered-answer", item.answer);
      if (item.answered_by) answer.append(el("span", "answered-by", ` — ${item.answered_by}`));
      entry.append(answer);
      box.append(entry);
    }
    return box;
  }

  function errorBox() {
    const box = el("p", "error");
    box.setAttribute("role", "alert");
    box.hidden = true;
    return box;
  }

  function approvalCard(card) {
    const root = el("article", "card approval");
    const reason = el("input", "reason");
    reason.type = "text";
    reason.maxLength = 10000;
    reason.placeholder = "Reason (required to reject)";
    reason.setAttribute("aria-label", "Reason");
    const approve = button("Approve", "approve", () =>
      act(card, `/api/approvals/${card.request_id}`, { approved: true, reason: reason.value }));
    const reject = button("Reject", "reject", () =>
      act(card, `/api/approvals/${card.request_id}`, { approved: false, reason: reason.value }));
    reject.disabled = true;
    reject.title = "Write a reason first";
    reason.addEventListener("input", () => { reject.disabled = !reason.value.trim(); });
    reason.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !reject.disabled) reject.click();
    });
    const actions = el("div", "actions");
    actions.append(approve, reason, reject);
    root.append(header(card, el("code", "file-path", card.file_path)), meta(card));
    if (card.description) root.append(el("p", "description", card.description));
    if (Array.isArray(card.answered) && card.answered.length) root.append(answeredView(card.answered));
    root.append(diffView(card.diff || ""), actions, errorBox());
    return root;
  }

  function questionCard(card) {
    const root = el("article", "card question");
    root.append(header(card, el("span", "kind-label", "Question")), meta(card));
    root.append(el("p", "question-text", card.question));
    if (card.context) root.append(el("div", "context", card.context));
    const answer = el("textarea", "answer");
    answer.maxLength = 100000;
    answer.placeholder = "Your answer (Ctrl+Enter sends)";
    answer.setAttribute("aria-label", "Answer");
    const send = button("Send", "send", () =>
      act(card, `/api/questions/${card.request_id}`, { response: answer.value }));
    send.disabled = true;
    answer.addEventListener("input", () => { send.disabled = !answer.value.trim(); });
    answer.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !send.disabled) send.click();
    });
    const actions = el("div", "actions");
    actions.append(send);
    root.append(answer, actions, errorBox());
    return root;
  }

  function addCard(card) {
    if (cards.has(card.request_id)) return; // already shown (snapshot and event may overlap)
    const element = card.kind === "approval" ? approvalCard(card) : questionCard(card);
    element.dataset.requestId = card.request_id;
    element.id = `request-${card.request_id}`; // a task page links here: <nexus>/#request-<id>
    const receivedLocal = Date.now();
    // The server's clock, estimated from its own figures, so deadlines count down correctly even
    // when this computer's clock is off.
    const serverOffset = Date.parse(card.received_at) + card.age_seconds * 1000 - receivedLocal;
    const entry = { card, element, receivedLocal, serverOffset };
    cards.set(card.request_id, entry);
    insertInOrder(lists[card.kind], entry);
    updateTiming(entry, Date.now());
    updateCounts();
    // A card that arrives after the page loaded: the browser could not scroll to it by itself.
    if (window.location.hash === `#${element.id}`) showTarget();
  }

  // <nexus>/#request-<id> (a task page's link): that card is outlined and scrolled to.
  function showTarget() {
    const id = window.location.hash.slice(1);
    for (const entry of cards.values()) entry.element.classList.toggle("targeted", entry.element.id === id);
    const target = [...cards.values()].find((entry) => entry.element.id === id);
    if (target) target.element.scrollIntoView({ block: "start" });
  }

  function insertInOrder(list, entry) {
    const at = Date.parse(entry.card.received_at);
    for (const child of list.children) {
      const other = cards.get(child.dataset.requestId);
      if (other && Date.parse(other.card.received_at) > at) {
        list.insertBefore(entry.element, child);
        return;
      }
    }
    list.append(entry.element);
  }

  function removeCard(requestId) {
    const entry = cards.get(requestId);
    if (!entry) return null;
    cards.delete(requestId);
    entry.element.remove();
    updateCounts();
    return entry.card;
  }

  function updateCounts() {
    for (const kind of ["approval", "question"]) {
      const n = lists[kind].children.length;
      document.getElementById(`${kind}s-count`).textContent = String(n);
      document.getElementById(`${kind}s-empty`).hidden = n > 0;
    }
  }

  function updateTiming(entry, now) {
    const { card, element, receivedLocal, serverOffset } = entry;
    const timing = element.querySelector(".timing");
    const age = card.age_seconds + (now - receivedLocal) / 1000;
    timing.replaceChildren(el("span", "age", `waiting ${formatDuration(age)}`));
    if (card.deadline) {
      const left = (Date.parse(card.deadline) - (now + serverOffset)) / 1000;
      timing.append(el("br"));
      timing.append(left > 0 ? el("span", "deadline", `expires in ${formatDuration(left)}`)
        : el("span", "deadline overdue", "deadline passed"));
    }
  }

  function label(card) {
    return card.kind === "approval" ? card.file_path : `question from ${card.agent_id}`;
  }

  // -- acting -------------------------------------------------------------------------------------

  function setBusy(element, busy) {
    element.classList.toggle("busy", busy);
    for (const control of element.querySelectorAll("button, input, textarea")) {
      if (busy) {
        control.dataset.wasDisabled = control.disabled ? "1" : "";
        control.disabled = true;
      } else {
        control.disabled = control.dataset.wasDisabled === "1";
      }
    }
  }

  function showError(element, message) {
    const box = element.querySelector(".error");
    box.textContent = message;
    box.hidden = false;
  }

  async function act(card, url, body) {
    const entry = cards.get(card.request_id);
    if (!entry) return;
    setBusy(entry.element, true);
    let response;
    let data = {};
    try {
      response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      data = await response.json().catch(() => ({}));
    } catch {
      setBusy(entry.element, false);
      showError(entry.element, "Could not reach Nexus. Nothing was decided; try again.");
      return;
    }
    if (response.status === 401) {
      window.location.assign("/login");
      return;
    }
    if (response.ok) {
      removeCard(card.request_id);
      toast(`${label(card)}: ${data.state || "done"}`);
    } else if (response.status === 404 || response.status === 409) {
      // Someone else got there first (or it expired): it is no longer ours to decide.
      removeCard(card.request_id);
      toast(`${label(card)}: ${data.error || "no longer pending"}`);
    } else {
      setBusy(entry.element, false);
      showError(entry.element, data.error || `Nexus answered ${response.status}; try again.`);
    }
  }

  // -- live updates -------------------------------------------------------------------------------

  function setStatus(state, text) {
    const status = document.getElementById("connection");
    status.className = `status ${state}`;
    status.textContent = text;
  }

  function applySnapshot(message) {
    const present = new Set();
    for (const card of [...message.approvals, ...message.questions]) {
      present.add(card.request_id);
      addCard(card); // cards already shown keep their element, and whatever the reviewer typed
    }
    for (const requestId of [...cards.keys()]) {
      if (!present.has(requestId)) removeCard(requestId);
    }
    document.getElementById("reviewer").textContent = message.reviewer || "";
    setStatus("live", "live");
  }

  function handle(message) {
    if (message.type === "snapshot") {
      applySnapshot(message);
    } else if (message.type === "added") {
      addCard(message.card);
    } else if (message.type === "removed") {
      const card = removeCard(message.request_id);
      if (card) toast(`${label(card)}: ${message.state}${message.by ? ` by ${message.by}` : ""}`);
    }
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws`);
    setStatus("connecting", "connecting…");
    socket.addEventListener("message", (event) => {
      retryDelay = 500;
      handle(JSON.parse(event.data));
    });
    socket.addEventListener("close", (event) => {
      if (event.code === 4401) {
        window.location.assign("/login");
        return;
      }
      setStatus("offline", "offline, reconnecting…");
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 10000);
    });
  }

  function start() {
    lists.approval = document.getElementById("approvals");
    lists.question = document.getElementById("questions");
    updateCounts();
    setInterval(() => {
      const now = Date.now();
      for (const entry of cards.values()) updateTiming(entry, now);
    }, 1000);
    window.addEventListener("hashchange", showTarget);
    connect();
  }

  start(); // the script is deferred: the document is parsed
})();
