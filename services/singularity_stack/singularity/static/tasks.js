// Singularity console: every task of this instance, newest first, and the form that submits one.
"use strict";

(() => {
  const { el, badge, formatCost, formatTime, api } = window.SingularityConsole;
  const POLL_MS = 2000;

  function row(task) {
    const tr = el("tr", "task");
    tr.dataset.taskId = task.id;
    const link = el("a", "task-link", task.description);
    link.href = `/console/tasks/${encodeURIComponent(task.id)}`;
    const described = el("td", "task-description");
    described.append(link, el("div", "muted task-agent", task.agent_id));
    const state = el("td", "task-state");
    state.append(badge(task.state));
    if (task.failure_reason) state.append(el("div", "muted failure", task.failure_reason));
    tr.append(
      described,
      state,
      el("td", "task-phase", task.phase || "—"),
      el("td", "task-cost", formatCost(task.cost_usd)),
      el("td", "task-created", formatTime(task.created_at)),
    );
    return tr;
  }

  async function refresh() {
    try {
      const { ok, data } = await api("/tasks");
      if (!ok || !Array.isArray(data)) throw new Error(data.error || "no task list");
      document.querySelector("#tasks tbody").replaceChildren(...data.map(row));
      document.getElementById("task-count").textContent = String(data.length);
      document.getElementById("tasks-empty").hidden = data.length > 0;
      document.getElementById("list-error").hidden = true;
    } catch (error) {
      const box = document.getElementById("list-error");
      box.textContent = `Could not load the tasks: ${error.message}`;
      box.hidden = false;
    }
  }

  async function submit(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const error = document.getElementById("form-error");
    const files = {};
    for (const file of document.getElementById("files").files) files[file.name] = await file.text();
    const body = {
      description: document.getElementById("description").value,
      language: document.getElementById("language").value,
      files,
    };
    form.querySelector("button[type=submit]").disabled = true;
    try {
      const { ok, data } = await api("/tasks", { method: "POST", body: JSON.stringify(body) });
      if (ok) {
        window.location.assign(`/console/tasks/${encodeURIComponent(data.id)}`);
        return;
      }
      error.textContent = data.error || "Singularity refused the task";
    } catch (failure) {
      error.textContent = `Could not reach Singularity: ${failure.message}`;
    }
    error.hidden = false;
    form.querySelector("button[type=submit]").disabled = false;
  }

  document.getElementById("new-task").addEventListener("submit", submit);
  refresh();
  setInterval(refresh, POLL_MS);
})();
