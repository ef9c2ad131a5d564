"""CentralCloud's console page: a static page whose scripts fetch /analytics and draw it with Chart.js.

The HTML holds no data (every value arrives as JSON and is drawn on a canvas or set as textContent), so
nothing from a queue or a model name can become markup. Chart.js is vendored in static/vendor/.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import HTMLResponse

from singularity_stack.service.console import static_page

STATIC = Path(__file__).parent / "static"
STATIC_PREFIX = "/static"


def console_page() -> HTMLResponse:
    return static_page(STATIC / "index.html")
