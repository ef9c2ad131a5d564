// Singularity console: one task, live. GET /tasks/{id} is polled every second while the task runs;
// each step of its timeline is updated in place (an opened request or reply stays open).
"use strict";

(() => {
  const { el, badge, formatCost, formatDuration, formatTime, safeUrl, diffView, api } = window.SingularityConsole;
  const POLL_MS = 1000;
  const FINISHED = new Set(["succeeded", "failed"]);
  const taskId = decodeURIComponent(window.location.pathname.split("/").pop());
  const rows = new Map(); // seq -> the step's element

  function lastUserMessage(request) {
    const messages = Array.isArray(request.messages) ? request.messages : [];
    const user = messages.filter((m) => m && m.role === "user");
    return user.length ? String(user[user.length - 1].content) : "";
  }

  function requestText(step) {
    const r = step.request || {};
    if (step.kind === "llm") return `${r.task_type || ""}\n\n${lastUserMessage(r)}`;
    if (step.kind === "job") return `${r.language || ""}\n\n${r.code || ""}`;
    if (step.kind === "approval") return `approve the change to ${r.file_path || ""} (the diff is below)`;
    if (step.kind === "question") return `${r.question || ""}${r.context ? `\n\n${r.context}` : ""}`;
    return JSON.stringify(r, null, 2);
  }

  function replyText(step) {
    const r = step.reply;
    if (!r) return step.error || (step.state === "waiting" ? "waiting…" : "");
    if (step.kind === "llm") return r.error ? `error: ${r.error}` : String(r.result || "");
    if (step.kind === "job") {
      const lint = Array.isArray(r.lint) && r.lint.length ? `\nlint:\n${r.lint.join("\n")}` : "";
      return `${r.status}${r.error ? `: ${r.error}` : ""}\n${r.output || ""}${lint}`;
    }
    if (step.kind === "approval") {
      return r.approved ? `approved by ${r.decided_by || "a reviewer"}` : `rejected by ${r.decided_by}: ${r.reason}`;
    }
    if (step.kind === "question") return `${r.response}${r.answered_by ? `\n— ${r.answered_by}` : ""}`;
    return JSON.stringify(r, null, 2);
  }

  function detail(className, label) {
    const box = el("details", className);
    box.append(el("summary", null, label), el("pre", "text"));
    return box;
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text; // unchanged text keeps a selection
  }

  function stepRow(step) {
    let row = rows.get(step.seq);
    if (!row) {
      row = el("li", "step");
      row.dataset.seq = String(step.seq);
      const head = el("div", "step-head");
      head.append(
        el("span", "step-seq"),
        el("span", "step-phase"),
        el("strong", "step-name"),
        el("span", "step-kind"),
        el("span", "step-state"),
        el("span", "step-model"),
        el("span", "step-cost"),
        el("span", "step-waited"),
      );
      row.append(head, detail("step-request", "request"), detail("step-reply", "reply"));
      document.getElementById("timeline").append(row);
      rows.set(step.seq, row);
    }
    const part = (name) => row.querySelector(`.${name}`);
    setText(part("step-seq"), String(step.seq));
    setText(part("step-phase"), step.phase);
    setText(part("step-name"), step.name);
    setText(part("step-kind"), step.kind);
    part("step-state").replaceChildren(badge(step.state));
    setText(part("step-model"), step.model || "—");
    setText(part("step-cost"), step.kind === "llm" ? formatCost(step.cost_usd) : "");
    setText(part("step-waited"), `${step.state === "waiting" ? "waiting " : "took "}${formatDuration(step.waited_seconds)}`);
    setText(row.querySelector(".step-request pre"), requestText(step));
    setText(row.querySelector(".step-reply pre"), replyText(step));
    row.className = `step kind-${["llm", "job", "approval", "question"].includes(step.kind) ? step.kind : "other"}`;
  }

  function renderReview(task) {
    const box = document.getElementById("review");
    const waiting = task.steps.find((s) => (s.kind === "approval" || s.kind === "question") && s.state === "waiting");
    if (!waiting) {
      box.hidden = true;
      return;
    }
    const what = waiting.kind === "approval" ? "approval of the change" : "an answer to its question";
    const url = safeUrl(waiting.review_url);
    const children = [el("span", null, `Waiting for ${what}. `)];
    if (url) {
      const link = el("a", "review-link", waiting.kind === "approval" ? "Open the approval card in Nexus" : "Open the question in Nexus");
      link.href = url;
      children.push(link);
    } else {
      children.push(el("span", "muted", "A reviewer decides it in Nexus's review page."));
    }
    box.replaceChildren(...children);
    box.hidden = false;
  }

  function renderDiff(task) {
    const approval = task.steps.find((s) => s.kind === "approval");
    const diff = (task.result && task.result.diff) || (approval && approval.request && approval.request.diff) || null;
    const section = document.getElementById("diff-section");
    section.hidden = diff === null;
    if (diff === null) return;
    const current = section.querySelector(".diff");
    if (current && current.dataset.source === diff) return;
    const view = diffView(diff);
    view.dataset.source = diff;
    if (current) current.replaceWith(view);
    else section.append(view);
  }

  function renderOutcome(task) {
    const box = document.getElementById("outcome");
    const parts = [];
    if (task.state === "succeeded") {
      const r = task.result || {};
      parts.push(el("p", "outcome-line", `Succeeded: ${r.file_path || ""} approved by ${r.approved_by || "a reviewer"}.`));
      if (r.output) parts.push(el("h3", null, "Output"), el("pre", "text outcome-output", r.output));
      if (r.review) parts.push(el("h3", null, "Review"), el("pre", "text outcome-review", r.review));
    } else if (task.state === "failed") {
      parts.push(el("p", "outcome-line error", `Failed: ${task.failure_reason || ""}`));
    } else {
      parts.push(el("p", "outcome-line muted", "Still running; this page follows it live."));
    }
    box.replaceChildren(...parts);
  }

  function render(task) {
    setText(document.getElementById("task-description"), task.description);
    document.getElementById("task-state").replaceChildren(badge(task.state));
    setText(document.getElementById("task-phase"), task.phase || "—");
    setText(document.getElementById("task-cost"), formatCost(task.cost_usd));
    setText(document.getElementById("task-models"), (task.models_used || []).join(", ") || "—");
    setText(document.getElementById("task-meta"), `${task.language} · agent ${task.agent_id} · created ${formatTime(task.created_at)}`);
    for (const step of task.steps) stepRow(step);
    document.getElementById("timeline-empty").hidden = task.steps.length > 0;
    renderReview(task);
    renderDiff(task);
    renderOutcome(task);
    document.body.dataset.state = task.state; // tests and people can see when it has settled
  }

  async function poll() {
    let finished = false;
    try {
      const { ok, data } = await api(`/tasks/${encodeURIComponent(taskId)}`);
      if (!ok) throw new Error(data.error || "no such task");
      render(data);
      finished = FINISHED.has(data.state);
      document.getElementById("page-error").hidden = true;
    } catch (error) {
      const box = document.getElementById("page-error");
      box.textContent = `Could not load the task: ${error.message}`;
      box.hidden = false;
    }
    if (!finished) setTimeout(poll, POLL_MS);
  }

  poll();
})();
