"""Open a report's index.html in headless Chromium: does every figure render, does every link resolve?

    python tests/browser_check.py reports/reference --screenshot /tmp/report.png

Two checks. The static one reads the HTML: every ``href="#x"`` has an element with ``id="x"``,
every relative link names a file beside the page, every image is an embedded PNG that decodes.
The browser one loads a copy of the page with a few lines of JavaScript appended that, once
the page has loaded, count the images whose ``naturalWidth`` is 0 (not rendered); Chromium's
``--dump-dom`` hands the result back. With ``--screenshot`` Chromium also draws the page's first
screen to a PNG. Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

_PNG = b"\x89PNG\r\n\x1a\n"
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || i.src.slice(0, 60); });
  var ids = {};
  Array.prototype.forEach.call(document.querySelectorAll('[id]'), function (n) { ids[n.id] = 1; });
  var dead = Array.prototype.slice.call(document.querySelectorAll('a[href^="#"]'))
                  .map(function (a) { return decodeURIComponent(a.getAttribute('href').slice(1)); })
                  .filter(function (h) { return !ids[h]; });
  document.body.setAttribute('data-browser-check',
      JSON.stringify({images: imgs.length, broken: broken, dead_links: dead,
                      height: document.documentElement.scrollHeight}));
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.imgs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append((a.get("alt") or "", a.get("src") or ""))

    handle_startendtag = handle_starttag


def static_problems(page: Path) -> list[str]:
    """Problems visible in the HTML itself: dead anchors, missing files, images that are not PNGs."""
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    problems = []
    for href in parser.hrefs:
        if href.startswith("#"):
            if href[1:] not in parser.ids:
                problems.append(f"link {href}: no element has id {href[1:]!r}")
        elif not re.match(r"^[a-z][a-z0-9+.-]*:", href) and not (page.parent / href.split("#")[0]).exists():
            problems.append(f"link {href}: no such file beside {page.name}")
    for alt, src in parser.imgs:
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            problems.append(f"image {alt[:60]!r}: not an embedded PNG ({src[:40]})")
            continue
        try:
            ok = base64.b64decode(src[len(prefix):], validate=True).startswith(_PNG)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"image {alt[:60]!r}: its data is not a PNG")
    return problems


def _chromium(chromium: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def browser_result(page: Path, chromium: str) -> dict:
    """Load a copy of ``page`` with the check script appended; return what the script found."""
    text = page.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(text.replace("</body>", _CHECK + "</body>", 1), encoding="utf-8")
        done = _chromium(chromium, "--virtual-time-budget=20000", "--dump-dom", copy.as_uri())
    m = re.search(r'data-browser-check="([^"]*)"', done.stdout)
    if not m:
        raise RuntimeError(f"Chromium gave no result for {page} (rc {done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:] or done.stdout[:200]}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, chromium: str, out: Path, width: int = 1280, height: int = 1000) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _chromium(chromium, f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
              "--virtual-time-budget=20000", page.resolve().as_uri())
    if not out.exists() or not out.read_bytes().startswith(_PNG):
        raise RuntimeError(f"Chromium wrote no screenshot of {page} to {out}")
    return out


def check(report_dir: Path, chromium: str | None, shot: Path | None = None) -> tuple[list[str], dict]:
    page = report_dir / "index.html" if report_dir.is_dir() else report_dir
    problems = static_problems(page)
    seen: dict = {}
    if chromium:
        seen = browser_result(page, chromium)
        problems += [f"image {b!r}: not rendered by Chromium" for b in seen["broken"]]
        problems += [f"link #{d}: Chromium finds no element with that id" for d in seen["dead_links"]]
        if shot is not None:
            screenshot(page, chromium, shot)
    return problems, seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="a report folder (its index.html) or an HTML file")
    ap.add_argument("--screenshot", type=Path, default=None, help="write the first screen to this PNG")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("browser_check: no Chromium found (install it: apt-get install chromium)", file=sys.stderr)
        return 2
    problems, seen = check(args.report, chromium, args.screenshot)
    for p in problems:
        print(p)
    print(f"{seen.get('images', 0)} image(s) rendered by Chromium, {len(seen.get('broken', []))} broken; "
          f"{len(problems)} problem(s); page height {seen.get('height', '?')} px")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
