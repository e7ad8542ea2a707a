"""The reader's test: open every page of the rendered book in headless Chromium and list what a reader would see broken.

Checks per page: the chapter's figures are there, loaded and drawn at a readable size, no broken image, no raw
markdown table, no echoed ``PosixPath(...)`` or ``<... object>``, no traceback, no unrendered math, nothing
sticking out of the content column. One full-page screenshot per page goes to the screenshots folder with
``report.json`` (page heights and problems).

    python -m helpers.book.reader _build/html --results results --screenshots _build/screenshots

Needs Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``) and Selenium; without a
browser the command line skips (exit 0), unless ``CI=true`` (exit 1).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from helpers.usage import OneLineParser, UsageError

WINDOW_PX = (1280, 900)  # CSS px, width x height of the browser window


MATHJAX_TIMEOUT_S = 10.0


IMAGES_TIMEOUT_S = 5.0


PAGE_LOAD_TIMEOUT_S = 30.0


MAX_SHOT_PX = 30000  # screenshots are cut at this height (CSS px)


OVERFLOW_TOLERANCE_PX = 2


#: A figure drawn at less than this fraction of its pixel width is too small to read (the book saves figures at
#: 130 dpi: at 0.5, 7-pt text is drawn about 6 px high).
MIN_FIGURE_SCALE = 0.5


MAX_OVERFLOW_REPORTS = 5


SKIP_REASON = (
    "Chromium/chromedriver not found; install them with 'apt-get install chromium chromium-driver' "
    "(Debian) to run the reader's test"
)


CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


EXCLUDED_NAMES = {"genindex.html", "search.html"}


EXCLUDED_DIRS = {"_static", "_sources", "_images"}


# `|---|`, `| --- |`, `|:--|`, and Sphinx's smart dashes `|—|`, `|–|`, anywhere in a line (a table in a <p> is
# one line).
TABLE_SEPARATOR = re.compile(r"\|[ \t]*(?::-+|:?-{3,}|:?[-—–]*[—–][-—–]*):?[ \t]*\|")


PIPE_ROW = re.compile(r"^\s*\|.*\|\s*$")


RAW_MATH = ("\\(", "\\)", "\\[", "$$", "\\begin{")


TRACEBACK = "Traceback (most recent call last)"


#: A Python object's default repr in the text, e.g. a glued value shown as ``<IPython.core.display.Markdown object>``.
ECHOED_OBJECT = re.compile(r"<[A-Za-z_][\w.]* object( at 0x[0-9a-f]+)?>")


@dataclass
class Problem:
    """Something a reader would see broken: ``page`` (relative html path), a short fixed label, and where/what."""

    page: str
    what: str
    detail: str


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths: env ``CHROMIUM``/``CHROMEDRIVER``, else on PATH; None if either is absent."""
    chromium = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver or not Path(chromium).is_file() or not Path(driver).is_file():
        return None
    return chromium, driver


def _is_redirect(path: Path) -> bool:
    """A stub that only forwards to another page (Jupyter Book's ``index.html`` -> the root page)."""
    return path.stat().st_size < 2048 and 'http-equiv="refresh"' in path.read_text(errors="replace").lower()


def book_pages(html_dir: Path) -> list[Path]:
    """Every rendered page under ``html_dir``, sorted; not genindex/search, _static/_sources/_images, redirects."""
    return sorted(
        p
        for p in html_dir.rglob("*.html")
        if p.name not in EXCLUDED_NAMES
        and not EXCLUDED_DIRS & set(p.relative_to(html_dir).parts[:-1])
        and not _is_redirect(p)
    )


def expected_figures(results_dir: Path) -> dict[str, list[str]]:
    """Page (``chapters/<chapter>.html``) -> the figure names its results file lists (``figures``, default [])."""
    expected: dict[str, list[str]] = {}
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("chapter"):
            expected[f"chapters/{data['chapter']}.html"] = [str(n) for n in data.get("figures") or []]
    return expected


# Waits (async): MathJax's first typeset, then every <img> (lazy ones made eager) decoded or failed.
_WAIT_JS = """
const done = arguments[arguments.length - 1], mathMs = arguments[0], imgMs = arguments[1];
const within = (p, ms) => Promise.race([p, new Promise(r => setTimeout(() => r('timeout'), ms))]);
const mj = window.MathJax && MathJax.startup && MathJax.startup.promise;
within(mj ? mj.then(() => 'ok', e => 'error: ' + e) : Promise.resolve('absent'), mathMs).then(math => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });
  const each = imgs.map(i => i.decode().then(() => { i.dataset.readerOk = '1'; }, () => {}));
  within(Promise.all(each), imgMs).then(() => done(math));
});
"""


# Measures the page (sync): height, figures, broken images, overflow, visible text of the content.
_CHECK_JS = """
const names = arguments[0], tol = arguments[1], maxReports = arguments[2], minScale = arguments[3];
const loaded = i => i.complete && i.naturalWidth > 0 || i.dataset.readerOk === '1';
const out = {height: document.documentElement.scrollHeight, figures: {}, broken: [], overflow: [], overflowTotal: 0,
             nFigures: document.querySelectorAll('figure.collisions-figure').length,
             nTables: document.querySelectorAll('article table').length};
const figImgs = new Set();
for (const name of names) {
  const img = document.querySelector('figure#' + CSS.escape('fig-' + name) + ' img');
  out.figures[name] = !img ? 'missing' : (!loaded(img) ? 'not loaded' :
    (img.getBoundingClientRect().width < minScale * img.naturalWidth ? 'too small' : 'ok'));
  if (img) figImgs.add(img);
}
for (const i of document.images)
  if (!figImgs.has(i) && !loaded(i)) out.broken.push((i.getAttribute('src') || '(no src)').slice(0, 100));
const col = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
const box = col.getBoundingClientRect();
const sticks = r => r.width > 0 && (r.right > box.right + tol || r.left < box.left - tol);
const label = (el, r) => ({tag: el.tagName.toLowerCase(), cls: el.getAttribute('class') || '', id: el.id || '',
  width: Math.round(r.width),
  text: (el.innerText || el.closest('mjx-container')?.textContent || el.textContent || '').trim()
    .replace(/\\s+/g, ' ').slice(0, 60)});
const report = (el, r) => {
  out.overflowTotal++;
  if (out.overflow.length < maxReports) out.overflow.push(label(el, r));
};
const walk = node => {
  for (const ch of node.childNodes) {
    if (ch.nodeType === Node.TEXT_NODE && ch.textContent.trim()) {
      const range = document.createRange(); range.selectNodeContents(ch);
      const r = range.getBoundingClientRect();
      if (sticks(r)) report(ch.parentElement, r);
    } else if (ch.nodeType === Node.ELEMENT_NODE) {
      const cs = getComputedStyle(ch);
      if (cs.display === 'none') continue;
      const r = ch.getBoundingClientRect();
      if (sticks(r) && cs.visibility !== 'hidden') { report(ch, r); continue; }
      if (['auto', 'scroll', 'hidden', 'clip'].includes(cs.overflowX)) continue;  // fits and clips its content
      walk(ch);
    }
  }
};
walk(col);
// Visible text of the content, without the author's code (input cells, literal blocks outside outputs).
const main = document.querySelector('main') || document.body;
const code = Array.from(main.querySelectorAll('.cell_input, div[class*="highlight-"]'))
  .filter(el => !el.closest('.cell_output, .output'));
const saved = code.map(el => el.style.display);
code.forEach(el => { el.style.display = 'none'; });
out.text = main.innerText;
code.forEach((el, k) => { el.style.display = saved[k]; });
out.tracebackEls = document.querySelectorAll('.output.traceback, .output.error').length +
  Array.from(document.querySelectorAll('.cell_output [class*="ansi-"]'))
    .filter(el => /\\b[A-Z]\\w*(Error|Exception)\\b/.test(el.textContent)).length;
out.mathEls = document.querySelectorAll('.math').length;
out.mjx = document.querySelectorAll('mjx-container').length;
return out;
"""


def text_problems(page: str, text: str) -> list[Problem]:
    """Problems in a page's visible text: raw markdown tables, echoed paths and object reprs, tracebacks, raw TeX."""
    problems: list[Problem] = []
    lines = text.splitlines()
    table = next((ln for ln in lines if TABLE_SEPARATOR.search(ln)), None)
    if table is None:
        table = next((a for a, b in itertools.pairwise(lines) if PIPE_ROW.match(a) and PIPE_ROW.match(b)), None)
    if table is not None:
        problems.append(Problem(page, "raw markdown table", table.strip()[:80]))
    if (k := text.find("PosixPath(")) >= 0:
        problems.append(Problem(page, "echoed path", text[k : k + 80].splitlines()[0]))
    if (m := ECHOED_OBJECT.search(text)) is not None:
        problems.append(Problem(page, "echoed object", m.group(0)))
    if TRACEBACK in text:
        problems.append(Problem(page, "traceback", f"'{TRACEBACK}' in the text"))
    raw = [m for m in RAW_MATH if m in text]
    if raw:
        k = min(text.find(m) for m in raw)
        problems.append(Problem(page, "unrendered math", f"{' '.join(raw)} in: {text[max(0, k - 20) : k + 40]!r}"))
    return problems


def _start_browser(chromium: str, chromedriver: str, profile: str) -> Any:
    """A Selenium Chrome session on the given binaries (Selenium Manager is never asked to download anything)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW_PX[0]},{WINDOW_PX[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    driver.set_script_timeout(MATHJAX_TIMEOUT_S + IMAGES_TIMEOUT_S + 5)
    return driver


def _check_page(
    driver: Any, html_dir: Path, path: Path, figures: list[str], screenshots: Path
) -> tuple[list[Problem], int, int, int]:
    """Open one page, check it, screenshot it: (problems, height in CSS px, figures and tables on the page)."""
    from selenium.common.exceptions import TimeoutException

    page = path.relative_to(html_dir).as_posix()
    try:
        driver.get(path.resolve().as_uri())
    except TimeoutException:  # a remote resource hangs: check what has loaded
        driver.execute_script("window.stop();")
    math = driver.execute_async_script(_WAIT_JS, MATHJAX_TIMEOUT_S * 1000, IMAGES_TIMEOUT_S * 1000)
    got = driver.execute_script(_CHECK_JS, figures, OVERFLOW_TOLERANCE_PX, MAX_OVERFLOW_REPORTS, MIN_FIGURE_SCALE)
    labels = {"missing": "missing figure", "not loaded": "figure not loaded", "too small": "figure too small"}
    problems = [Problem(page, labels[state], f"fig-{name}") for name, state in got["figures"].items() if state != "ok"]
    problems += [Problem(page, "broken image", src) for src in got["broken"]]
    problems += text_problems(page, got["text"])
    if got["tracebackEls"] and not any(p.what == "traceback" for p in problems):
        problems.append(Problem(page, "traceback", f"{got['tracebackEls']} error output(s)"))
    if got["mathEls"] and not got["mjx"] and not any(p.what == "unrendered math" for p in problems):
        problems.append(Problem(page, "unrendered math", f"{got['mathEls']} .math elements, MathJax: {math}"))
    for k, o in enumerate(got["overflow"]):
        more = (
            f" (+{got['overflowTotal'] - MAX_OVERFLOW_REPORTS} more)"
            if k == MAX_OVERFLOW_REPORTS - 1 and got["overflowTotal"] > MAX_OVERFLOW_REPORTS
            else ""
        )
        problems.append(
            Problem(
                page, "overflow", f"<{o['tag']} class='{o['cls']}' id='{o['id']}'> {o['width']} px: {o['text']!r}{more}"
            )
        )
    height = int(got["height"])
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WINDOW_PX[0], "height": min(height, MAX_SHOT_PX), "scale": 1},
        },
    )
    (screenshots / page.replace("/", "__").replace(".html", ".png")).write_bytes(base64.b64decode(shot["data"]))
    return problems, height, int(got["nFigures"]), int(got["nTables"])


def check_book(
    html_dir: Path, results_dir: Path | None, screenshots: Path, log: Callable[[str], None] | None = None
) -> tuple[list[Problem], dict[str, int]]:
    """Check every page of the rendered book in one headless Chromium.

    Returns the problems and each page's height (CSS px); writes one PNG per page and ``report.json`` into
    ``screenshots``. ``log`` gets one line per page. Raises RuntimeError when no browser is found.
    """
    browser = find_browser()
    if browser is None:
        raise RuntimeError(SKIP_REASON)
    screenshots.mkdir(parents=True, exist_ok=True)
    expected = expected_figures(results_dir) if results_dir else {}
    pages = book_pages(html_dir)
    problems: list[Problem] = []
    heights: dict[str, int] = {}
    shown: dict[str, dict[str, int]] = {}
    known = {p.relative_to(html_dir).as_posix() for p in pages}
    for page, names in expected.items():
        if page not in known:
            problems += [Problem(page, "missing figure", f"fig-{n} (page not rendered)") for n in names]
    with tempfile.TemporaryDirectory(prefix="reader-profile-") as profile:
        driver = _start_browser(*browser, profile)
        try:
            for path in pages:
                page = path.relative_to(html_dir).as_posix()
                found, heights[page], n_figures, n_tables = _check_page(
                    driver, html_dir, path, expected.get(page, []), screenshots
                )
                shown[page] = {"figures": n_figures, "tables": n_tables}
                problems += found
                if log:
                    summary = "ok" if not found else "; ".join(f"{p.what}: {p.detail}" for p in found)
                    log(f"[reader] {page}: {heights[page]} px, {n_figures} figures, {n_tables} tables, {summary}")
        finally:
            driver.quit()
    report = {"heights_px": heights, "shown": shown, "problems": [asdict(p) for p in problems]}
    (screenshots / "report.json").write_text(json.dumps(report, indent=1))
    return problems, heights


def main(argv: list[str] | None = None) -> int:
    """Command line; exit 0 when every page is fine (or no browser outside CI), 1 on problems, 2 on bad arguments."""
    parser = OneLineParser(prog="python -m helpers.book.reader", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, help="the rendered book (_build/html)")
    parser.add_argument("--results", type=Path, help="results folder: the figures each chapter must show")
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    try:
        args = parser.parse_args(argv)
        if not (args.html_dir / "index.html").is_file():
            parser.error(f"{args.html_dir} is not a rendered book (no index.html)")
        if args.results is not None and not args.results.is_dir():
            parser.error(f"results folder {args.results} does not exist")
    except UsageError as err:
        print(f"[reader] error: {err}", file=sys.stderr)
        return 2
    reason = SKIP_REASON if find_browser() is None else None
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = reason or "selenium is not installed (pip install selenium)"
    if reason:
        print(f"[reader] skipped: {reason}")
        return 1 if os.environ.get("CI") == "true" else 0
    problems, heights = check_book(args.html_dir, args.results, args.screenshots, log=print)
    print(f"[reader] {len(heights)} pages, {len(problems)} problems; screenshots in {args.screenshots}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
