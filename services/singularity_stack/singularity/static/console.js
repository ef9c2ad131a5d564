// Singularity console: helpers both pages share. Every value from a task goes in with textContent
// (never innerHTML), so a description, diff or model name full of HTML stays the text it is.
"use strict";

window.SingularityConsole = (() => {
  const STATES = new Set(["pending", "running", "waiting", "succeeded", "done", "failed", "expired"]);

  function el(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = String(text);
    return element;
  }

  // A state as a coloured badge; a state this page does not know gets the plain style, never a class from data.
  function badge(state) {
    const known = STATES.has(state) ? state : "unknown";
    return el("span", `badge state-${known}`, state);
  }

  function formatDuration(totalSeconds) {
    const s = Math.max(0, Math.floor(Number(totalSeconds) || 0));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function formatCost(value) {
    return `$${(Number(value) || 0).toFixed(4)}`;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso || "") : date.toLocaleString();
  }

  // Only links to web pages: a URL from data never becomes javascript: or data:.
  function safeUrl(value) {
    return typeof value === "string" && /^https?:\/\//i.test(value) ? value : null;
  }

  // A unified diff, one block per line, coloured by kind; long lines wrap (nothing is cut off).
  function diffView(diff) {
    const box = el("pre", "diff");
    box.tabIndex = 0;
    const lines = String(diff || "").split("\n");
    if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
    let inHunk = false;
    for (const line of lines) {
      let kind = "ctx";
      if (line.startsWith("@@")) {
        kind = "hunk";
        inHunk = true;
      } else if (!inHunk && /^(---|\+\+\+)/.test(line)) {
        kind = "file";
      } else if (line.startsWith("+")) {
        kind = "add";
      } else if (line.startsWith("-")) {
        kind = "del";
      }
      box.append(el("span", `line ${kind}`, line));
    }
    if (!diff) box.append(el("span", "line ctx", "(empty diff)"));
    return box;
  }

  // GET or POST JSON with the session cookie; a lost session goes back to the login form.
  async function api(url, options) {
    const response = await fetch(url, {
      credentials: "same-origin",
      headers: { Accept: "application/json", ...(options && options.body ? { "Content-Type": "application/json" } : {}) },
      ...options,
    });
    if (response.status === 401) {
      window.location.assign("/login");
      throw new Error("the session ended; log in again");
    }
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  }

  return { el, badge, formatDuration, formatCost, formatTime, safeUrl, diffView, api };
})();
