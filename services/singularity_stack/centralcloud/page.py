"""The small read-only analytics page: server-rendered, every value escaped."""

from __future__ import annotations

from html import escape
from typing import Any


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='empty'>nothing yet</p>"
    head = "".join(f"<th>{escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: dict[str, Any] | None, computed_at: str | None) -> str:
    if report is None:
        content = "<p>No analytics run has finished yet.</p>"
    else:
        content = (
            f"<p>Computed {escape(computed_at or '')} from the shared_queue archives.</p>"
            f"<h2>LLM requests by task type, complexity and model</h2>{_table(report['llm'])}"
            f"<h2>Approvals</h2>{_table([report['approvals']])}"
            f"<h2>Jobs by language and outcome</h2>{_table(report['jobs'])}"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>CentralCloud analytics</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem}"
        "th{background:#f3f3f3;text-align:left}.empty{color:#888}</style></head>"
        f"<body><h1>CentralCloud analytics</h1>{content}"
        "<p><a href='/analytics'>JSON</a> · <a href='/metrics'>metrics</a></p></body></html>"
    )
