// CentralCloud's console: fetch /analytics, draw it with Chart.js. Data is only ever drawn on a canvas or
// set as textContent (never innerHTML), so a hostile model or queue name stays text.
"use strict";

(function () {
  const f = window.ccFormat;
  const PALETTE = ["#0969da", "#1a7f37", "#cf222e", "#9a6700", "#8250df", "#bf3989", "#1b7c83", "#6e7781",
    "#fb8500", "#2da44e", "#a40e26", "#0550ae"];
  const MOST_SERIES = 10; // more than that in one chart: the rest become "others"
  const charts = {};
  let latest = null;
  let timer = null;
  let renders = 0;

  const $ = (id) => document.getElementById(id);
  const color = (i) => PALETTE[i % PALETTE.length];

  function setText(id, text) { $(id).textContent = text; }

  function showGroup(name, hasData) {
    document.querySelector(`[data-empty-for="${name}"]`).hidden = hasData;
    document.querySelector(`[data-chart-group="${name}"]`).hidden = !hasData;
  }

  // -- chart plumbing -------------------------------------------------------------------------------

  // A time axis over the points, padded by at least `padMs` each side: one point alone still gets a
  // readable span around it instead of Chart.js's default of ±1 ms.
  function timeAxis(points, padMs) {
    const xs = points.map((p) => p.x);
    const first = xs.length ? Math.min(...xs) : Date.now();
    const last = xs.length ? Math.max(...xs) : first;
    const pad = Math.max(padMs, (last - first) * 0.04);
    const span = last - first + 2 * pad;
    return {
      type: "linear",
      min: first - pad,
      max: last + pad,
      ticks: { callback: (value) => f.tick(value, span), maxRotation: 0, autoSkipPadding: 12 },
    };
  }

  function draw(name, config) {
    const canvas = document.querySelector(`canvas[data-chart="${name}"]`);
    const existing = charts[name];
    if (existing && existing.config.type === config.type) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update("none");
      return;
    }
    if (existing) existing.destroy();
    charts[name] = new window.Chart(canvas, config);
  }

  function options(yFormat, xAxis, extra) {
    return Object.assign({
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: xAxis,
        // counts step by whole numbers: no "0.5 requests"
        y: { beginAtZero: true, ticks: { callback: (v) => yFormat(v), precision: yFormat === f.count ? 0 : undefined } },
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        tooltip: {
          callbacks: {
            title: (items) => (items.length && xAxis.type === "linear" ? f.when(items[0].parsed.x) : items[0]?.label),
            label: (item) => `${item.dataset.label}: ${yFormat(item.parsed.y)}`,
          },
        },
      },
    }, extra || {});
  }

  // Series by key over time, each bucket of the span present (0 when nothing happened in it).
  function series(rows, key, value, bucketMs) {
    const totals = new Map();
    const byKey = new Map();
    const ts = rows.map((r) => r.t);
    const first = Math.min(...ts), last = Math.max(...ts);
    for (const row of rows) {
      const k = String(row[key] ?? "unknown");
      if (!byKey.has(k)) byKey.set(k, new Map());
      const at = byKey.get(k);
      at.set(row.t, (at.get(row.t) || 0) + row[value]);
      totals.set(k, (totals.get(k) || 0) + row[value]);
    }
    let keys = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
    if (keys.length > MOST_SERIES) {
      const others = new Map();
      for (const k of keys.slice(MOST_SERIES - 1)) {
        for (const [t, v] of byKey.get(k)) others.set(t, (others.get(t) || 0) + v);
      }
      keys = keys.slice(0, MOST_SERIES - 1);
      byKey.set("others", others);
      keys.push("others");
    }
    return keys.map((k, i) => {
      const at = byKey.get(k);
      const data = [];
      for (let t = first; t <= last; t += bucketMs) data.push({ x: t, y: at.get(t) || 0 });
      return { label: k, data, borderColor: color(i), backgroundColor: color(i), pointRadius: 3, tension: 0 };
    });
  }

  // -- each part of the page ------------------------------------------------------------------------

  function renderTiles(data) {
    const r = data.report;
    const requests = r.llm.reduce((n, row) => n + row.requests, 0);
    const cost = r.llm.reduce((n, row) => n + row.cost_usd, 0);
    const errors = r.llm.reduce((n, row) => n + row.errors, 0);
    setText("tile-llm", f.count(requests));
    setText("tile-llm-note", `${f.money(cost)} in all · ${f.count(errors)} failed`);
    const a = r.approvals;
    setText("tile-approvals", `${f.ofTotal(a.decided, a.requests)} decided`);
    setText("tile-approvals-note", a.decided
      ? `${f.count(a.approved)} approved (${f.percent(a.approval_rate)}) · median response ${f.duration(a.median_response_seconds)}`
      : "no decisions yet");
    const jobs = r.jobs.reduce((n, row) => n + row.jobs, 0);
    const ok = r.jobs.filter((row) => row.status === "ok").reduce((n, row) => n + row.jobs, 0);
    setText("tile-jobs", f.count(jobs));
    setText("tile-jobs-note", jobs ? `${f.ofTotal(ok, jobs)} ok` : "no jobs yet");
    const waiting = data.dead_letters.reduce((n, d) => n + d.waiting, 0);
    const ever = data.dead_letters.reduce((n, d) => n + d.ever, 0);
    setText("tile-dead", f.count(waiting));
    setText("tile-dead-note", `waiting in dead-letter queues · ${f.count(ever)} ever`);
  }

  function renderLlm(report) {
    const rows = report.llm_over_time;
    showGroup("llm", rows.length > 0);
    if (!rows.length) return;
    const bucketMs = report.bucket_seconds * 1000;
    const key = $("llm-group").value;
    const requests = series(rows, key, "requests", bucketMs);
    const cost = series(rows, key, "cost_usd", bucketMs);
    const axis = timeAxis(requests[0].data, bucketMs);
    draw("llm-requests", { type: "line", data: { datasets: requests }, options: options(f.count, axis) });
    draw("llm-cost", { type: "line", data: { datasets: cost }, options: options(f.money, axis) });
  }

  function renderApprovals(report) {
    const rows = report.approval_decisions;
    showGroup("approvals", rows.length > 0);
    if (!rows.length) return;
    const bucketMs = report.bucket_seconds * 1000;
    const flat = rows.flatMap((r) => [
      { t: r.t, verdict: "approved", n: r.approved },
      { t: r.t, verdict: "rejected", n: r.rejected },
    ]);
    const decisions = series(flat, "verdict", "n", bucketMs);
    decisions.forEach((d) => { d.borderColor = d.backgroundColor = d.label === "approved" ? "#1a7f37" : "#cf222e"; });
    draw("approval-decisions", {
      type: "line", data: { datasets: decisions }, options: options(f.count, timeAxis(decisions[0].data, bucketMs)),
    });
    const points = (approved) => report.response_times.filter((r) => r.approved === approved)
      .map((r) => ({ x: r.t, y: r.seconds }));
    const times = [
      { label: "approved", data: points(true), backgroundColor: "#1a7f37", borderColor: "#1a7f37", pointRadius: 4 },
      { label: "rejected", data: points(false), backgroundColor: "#cf222e", borderColor: "#cf222e", pointRadius: 4 },
    ];
    draw("response-times", {
      type: "scatter", data: { datasets: times },
      options: options(f.duration, timeAxis([...times[0].data, ...times[1].data], 60 * 1000)),
    });
  }

  function renderJobs(report) {
    const rows = report.jobs;
    showGroup("jobs", rows.length > 0);
    if (!rows.length) return;
    const languages = [...new Set(rows.map((r) => r.language))].sort();
    const statuses = [...new Set(rows.map((r) => r.status))].sort();
    const datasets = statuses.map((status, i) => ({
      label: status,
      data: languages.map((l) => rows.filter((r) => r.language === l && r.status === status)
        .reduce((n, r) => n + r.jobs, 0)),
      backgroundColor: status === "ok" ? "#1a7f37" : color(i + 2),
    }));
    const opts = options(f.count, { type: "category", stacked: true });
    opts.scales.y.stacked = true;
    draw("jobs", { type: "bar", data: { labels: languages, datasets }, options: opts });
  }

  function renderDeadLetters(dead) {
    showGroup("dead-letters", dead.length > 0);
    if (!dead.length) return;
    draw("dead-letters", {
      type: "bar",
      data: {
        labels: dead.map((d) => d.queue),
        datasets: [
          { label: "waiting now", data: dead.map((d) => d.waiting), backgroundColor: "#cf222e" },
          { label: "ever", data: dead.map((d) => d.ever), backgroundColor: "#d1d9e0" },
        ],
      },
      options: options(f.count, { type: "category" }),
    });
  }

  function renderQueues(queues) {
    showGroup("queues", queues.series.length > 0);
    if (!queues.series.length) return;
    const line = (q, i, value) => ({
      label: q.queue, data: q.points.map((p) => ({ x: p.t, y: p[value] ?? 0 })),
      borderColor: color(i), backgroundColor: color(i), pointRadius: 2, tension: 0,
    });
    const depth = queues.series.map((q, i) => line(q, i, "length"));
    const age = queues.series.map((q, i) => line(q, i, "oldest_age_seconds"));
    const axis = timeAxis(depth.flatMap((d) => d.data), Math.max((queues.bin_seconds || 0) * 1000, 60 * 1000));
    draw("queue-depth", { type: "line", data: { datasets: depth }, options: options(f.count, axis) });
    draw("queue-age", { type: "line", data: { datasets: age }, options: options(f.duration, axis) });
  }

  function renderTable(rows) {
    showGroup("llm-table", rows.length > 0);
    const cells = (row) => [row.task_type, row.complexity, row.model, f.count(row.requests), f.count(row.errors),
      f.money(row.cost_usd)];
    const body = $("llm-table").tBodies[0];
    body.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      cells(row).forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i >= 3) td.className = "num";
        tr.append(td);
      });
      return tr;
    }));
  }

  function renderStatus(data) {
    const s = data.settings;
    setText("status", data.computed_at
      ? `Computed ${f.when(data.computed_at)} from the shared_queue archives · this page refreshes every ${f.duration(s.console_refresh_seconds)}`
      : "No analytics run has finished yet; the first runs when CentralCloud starts.");
    setText("settings-note",
      `Recomputed within ${f.duration(s.archive_check_interval_seconds)} of a message being archived and every ` +
      `${f.duration(s.analytics_interval_seconds)} regardless; queues sampled every ${f.duration(s.metrics_interval_seconds)}, ` +
      `kept ${f.duration(s.queue_sample_retention_hours * 3600)}.`);
    document.querySelectorAll(".sample-interval").forEach((e) => { e.textContent = f.duration(s.metrics_interval_seconds); });
    const bucket = data.report ? f.duration(data.report.bucket_seconds) : "";
    document.querySelectorAll(".bucket").forEach((e) => { e.textContent = bucket; });
  }

  function render(data) {
    latest = data;
    renderStatus(data);
    const report = data.report || {
      llm: [], approvals: { requests: 0, decided: 0 }, jobs: [], llm_over_time: [], approval_decisions: [],
      response_times: [], bucket_seconds: 60,
    };
    renderTiles(Object.assign({}, data, { report }));
    renderLlm(report);
    renderApprovals(report);
    renderJobs(report);
    renderDeadLetters(data.dead_letters);
    renderQueues(data.queues);
    renderTable(report.llm);
    renders += 1;
    document.body.dataset.renders = String(renders);
    document.body.dataset.computedAt = data.computed_at || "";
  }

  // -- fetching ------------------------------------------------------------------------------------

  async function call(method) {
    const response = await fetch(method === "GET" ? "/analytics" : "/analytics/recompute", {
      method,
      credentials: "same-origin",
      headers: method === "GET" ? {} : { "content-type": "application/json" },
      body: method === "GET" ? undefined : "{}",
    });
    if (response.status === 401) {
      window.location.assign("/login");
      throw new Error("the session has ended; log in again");
    }
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  function problem(error) {
    const p = $("problem");
    p.textContent = error ? `Could not load the analytics: ${error.message}` : "";
    p.hidden = !error;
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      render(await call("GET"));
      problem(null);
    } catch (error) {
      problem(error);
    }
    const seconds = latest ? latest.settings.console_refresh_seconds : 15;
    timer = setTimeout(refresh, seconds * 1000);
  }

  async function recompute() {
    const button = $("recompute");
    button.disabled = true;
    button.textContent = "Recomputing…";
    try {
      render(await call("POST"));
      problem(null);
    } catch (error) {
      problem(error);
    } finally {
      button.disabled = false;
      button.textContent = "Recompute now";
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("recompute").addEventListener("click", recompute);
    $("llm-group").addEventListener("change", () => { if (latest && latest.report) renderLlm(latest.report); });
    refresh();
  });
})();
