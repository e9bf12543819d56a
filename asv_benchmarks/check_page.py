"""Open the published asv dashboard in headless Chromium and check that its charts drew.

Serves the html folder (``run.sh publish``) on 127.0.0.1 at a free port, with every other
address blocked in the browser (so the check also proves that the page needs no internet:
publish with ``--local-assets``), then:

1. loads the index page: it must not end on asv's ``error.html`` ("external (JavaScript)
   dependencies failed to load"), and asv's benchmark list must have entries;
2. opens the graph page of the first benchmark with results and waits for flot's plot: no asv
   dialog ("No data for this combination of filters"), at least one series with points, and a
   canvas with drawn (non-transparent) pixels;
3. writes a screenshot of that page (``--screenshot``, default ``.asv/page-check.png``).

Exit status 0 when all checks pass, 1 with the reason otherwise, 2 when no browser can run.

Needs the ``playwright`` Python package (``pip install playwright``) and a Chromium: the one
playwright installs (``playwright install chromium``) or, where its download is blocked, the
system's (Debian: ``apt-get install chromium``; found on PATH, or ``--chromium PATH``).

    python asv_benchmarks/check_page.py [--html .asv/html] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import json
import shutil
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Seconds to wait for the page's scripts and for a plot.
TIMEOUT_S = 30

_DRAWN_PIXELS_JS = """
canvas => {
    const context = canvas.getContext("2d");
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let drawn = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) drawn++;
    return {width: canvas.width, height: canvas.height, drawn: drawn};
}
"""


#: Points with a value in each series of flot's main plot (asv keeps the plot on #main-graph).
_PLOTTED_POINTS_JS = """
() => {
    const plot = $("#main-graph").data("plot");
    if (!plot) return null;
    return plot.getData().map(series => series.data.filter(p => p && p[1] !== null).length);
}
"""


class PageCheckError(RuntimeError):
    """A check failed; the message says which and what the page showed."""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def serve(html: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``html`` on 127.0.0.1 at a free port, from a daemon thread; the server and its
    address."""
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def find_chromium(explicit: str | None) -> str | None:
    """A Chromium executable: ``explicit``, else the system's on PATH, else None (playwright's
    own, if installed)."""
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def first_with_data(html: Path, names: list[str]) -> tuple[str, tuple]:
    """The first benchmark (by name) with a measured value, and its parameter values there.

    Reads the graph files that ``asv publish`` wrote (``graphs/.../NAME.json``: per commit, one
    value per parameter combination, in the order of the product of the parameters).
    """
    index = json.loads((html / "index.json").read_text())
    for name in names:
        for path in sorted((html / "graphs").rglob(f"{name}.json")):
            if "summary" in path.relative_to(html / "graphs").parts:
                continue
            for _, values in json.loads(path.read_text()):
                values = values if isinstance(values, list) else [values]
                for flat_index, value in enumerate(values):
                    if value is not None:
                        params = index["benchmarks"][name]["params"]
                        combinations = list(itertools.product(*params)) if params else [()]
                        return name, combinations[flat_index]
    raise PageCheckError("no benchmark has results: run run.sh history or current first")


def check(html: Path, chromium: str | None, screenshot: Path) -> list[str]:
    """Run the checks; the lines of a report. Raises PageCheckError on a failed check."""
    from playwright.sync_api import sync_playwright

    if not (html / "index.html").exists():
        raise PageCheckError(f"{html / 'index.html'} does not exist: run run.sh publish first")
    server, base = serve(html)
    report = []
    blocked = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def only_local(route):
                if route.request.url.startswith(base):
                    return route.continue_()
                blocked.append(route.request.url)
                return route.abort()

            page.route("**/*", only_local)
            page.goto(base + "index.html", wait_until="load", timeout=TIMEOUT_S * 1000)
            # asv's index redirects to error.html when a script fails to load.
            page.wait_for_timeout(1000)
            if page.url.endswith("error.html"):
                raise PageCheckError(
                    "the page shows asv's error page (a script failed to load); blocked "
                    f"requests: {blocked or 'none'}"
                )
            page.wait_for_selector(
                ".benchmark-container, #summarylist, .summary-container",
                timeout=TIMEOUT_S * 1000,
            )
            names = page.evaluate(
                "() => (window.$ && $.asv && $.asv.main_json) "
                "? Object.keys($.asv.main_json.benchmarks).sort() : []"
            )
            if not names:
                raise PageCheckError("the index page lists no benchmarks")
            report.append(f"index: loaded, {len(names)} benchmarks listed, no error page")

            name, params = first_with_data(html, names)
            # The graph page of that benchmark with its parameters set to a measured
            # combination (asv's default selection, the first value of each, may have none).
            benchmark = page.evaluate(f"() => $.asv.main_json.benchmarks[{name!r}]")
            selection = {
                f"p-{param_name}": [value]
                for param_name, value in zip(benchmark["param_names"], params, strict=True)
            }
            address = page.evaluate(
                "([name, params]) => $.asv.format_hash_string({location: [name], params})",
                [name, selection],
            )
            page.goto(f"{base}index.html{address}", timeout=TIMEOUT_S * 1000)
            # The index's summary grid keeps its (now hidden) thumbnails: look at what is shown.
            page.wait_for_selector("#main-graph canvas.flot-base", timeout=TIMEOUT_S * 1000)
            page.wait_for_timeout(1000)  # asv loads the graph data, then flot draws
            if page.url.endswith("error.html"):
                raise PageCheckError("the graph page ended on asv's error page")
            dialog = page.locator(".modal-dialog >> visible=true")
            if dialog.count():
                raise PageCheckError(f"the graph page shows a dialog: {dialog.first.inner_text()}")
            points = page.evaluate(_PLOTTED_POINTS_JS)
            if not points or not any(points):
                raise PageCheckError(f"the plot of {name} has no points: {points}")
            canvas = page.locator("#main-graph canvas.flot-base").first
            pixels = canvas.evaluate(_DRAWN_PIXELS_JS)
            if not pixels["drawn"]:
                raise PageCheckError(f"the plot canvas of {name} is blank: {pixels}")
            report.append(
                f"graph {name} {', '.join(params)}: {len(points)} series, {sum(points)} points "
                "plotted, canvas "
                f"{pixels['width']}x{pixels['height']} with {pixels['drawn']} drawn pixels"
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            report.append(f"screenshot: {screenshot}")
            browser.close()
    finally:
        server.shutdown()
    report.append(
        f"requests outside 127.0.0.1 blocked: {len(blocked)}"
        + (f" ({', '.join(sorted(set(blocked))[:3])}...)" if blocked else "")
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=HERE / ".asv" / "html")
    parser.add_argument("--chromium", help="the Chromium executable (default: from PATH)")
    parser.add_argument("--screenshot", type=Path, default=HERE / ".asv" / "page-check.png")
    args = parser.parse_args(argv)
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("check_page.py: needs playwright: pip install playwright", file=sys.stderr)
        return 2
    try:
        report = check(args.html, find_chromium(args.chromium), args.screenshot)
    except PageCheckError as error:
        print(f"check_page.py: FAILED: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the browser could not start: say so, apart from a failure
        if type(error).__name__ == "Error" and "Executable doesn't exist" in str(error):
            print(
                "check_page.py: no Chromium: apt-get install chromium, or "
                "playwright install chromium, or --chromium PATH",
                file=sys.stderr,
            )
            return 2
        raise
    for line in report:
        print(line)
    print("check_page.py: the dashboard loads offline and its charts drew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
