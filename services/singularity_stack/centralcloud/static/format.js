// Numbers and times for people: "$0.02", "1.2 s", "3 of 5", dates in the viewer's local time zone.
// Missing values get words, never "null" or "None".
"use strict";

(function () {
  const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

  function money(usd) {
    if (usd === null || usd === undefined || Number.isNaN(usd)) return "no cost recorded";
    if (usd === 0) return "$0.00";
    if (Math.abs(usd) < 0.01) return "$" + usd.toPrecision(2).replace(/0+$/, "");
    return "$" + usd.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "not yet";
    const s = Math.abs(seconds);
    if (s < 1) return Math.round(seconds * 1000) + " ms";
    if (s < 60) return number.format(seconds) + " s";
    if (s < 3600) return number.format(seconds / 60) + " min";
    if (s < 86400) return number.format(seconds / 3600) + " h";
    return number.format(seconds / 86400) + " d";
  }

  function count(n) {
    return (n ?? 0).toLocaleString();
  }

  function ofTotal(part, total) {
    return count(part) + " of " + count(total);
  }

  function percent(ratio) {
    if (ratio === null || ratio === undefined) return "no decisions yet";
    return Math.round(ratio * 100) + "%";
  }

  const full = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
  });
  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const clockSeconds = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const day = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit" });

  // A moment (epoch ms or ISO 8601) in local time, with its zone.
  function when(value) {
    if (value === null || value === undefined) return "never";
    return full.format(new Date(value));
  }

  // An axis tick: as precise as the chart's span needs.
  function tick(ms, spanMs) {
    if (spanMs > 2 * 86400 * 1000) return day.format(new Date(ms));
    if (spanMs < 600 * 1000) return clockSeconds.format(new Date(ms));
    return clock.format(new Date(ms));
  }

  window.ccFormat = { money, duration, count, ofTotal, percent, when, tick };
})();
