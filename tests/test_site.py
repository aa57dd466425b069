"""The built site, opened in a real browser.

Builds the HTML site at the CI profile into a temporary folder, serves it on
localhost and opens every chapter page in headless Chromium (Debian's ``chromium``
and ``chromium-driver``; ``.ci/run`` installs them when missing). Each page must
load every figure, render its maths, and carry a Colab button that points at the
chapter's paired ``.ipynb``; no internal link of the site may be broken. A
screenshot of each page is kept under ``test-artifacts/screenshots/``.

Without Chromium the test is skipped, unless ``REQUIRE_BROWSER=1`` (as in CI), in
which case it fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.md"))

if not (CHROMIUM and DRIVER):
    if os.environ.get("REQUIRE_BROWSER") == "1":
        raise RuntimeError("REQUIRE_BROWSER=1 but chromium or chromedriver is not installed")
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, BOOK_PROFILE="ci", BOOK_PROGRESS="0")
    build = subprocess.run(
        [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "--all", "-W",
         "--keep-going", "--path-output", str(out)],
        env=env, capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,2000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_renders(chapter, site, server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    page = site / "notebooks" / f"{chapter}.html"
    assert page.exists(), f"{chapter} was not built (is it in _toc.yml?)"
    browser.get(f"{server}/notebooks/{chapter}.html")
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    # Wait for MathJax to finish typesetting before counting rendered formulas.
    browser.execute_async_script(
        "const done = arguments[0];"
        "if (window.MathJax && MathJax.startup) { MathJax.startup.promise.then(done); }"
        "else { done(); }")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth]);")
    figures = [i for i in images if "/_images/" in i[0]]
    assert figures, f"{chapter} shows no figure"
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"{chapter}: images that did not load: {broken}"
    rendered = browser.execute_script("return document.querySelectorAll('mjx-container').length;")
    raw = browser.execute_script(
        "return document.querySelectorAll('.math:not(:has(mjx-container))').length;")
    assert rendered > 0 and raw == 0, f"{chapter}: {rendered} formulas rendered, {raw} left raw"
    colab = browser.execute_script(
        "return Array.from(document.querySelectorAll('a')).map(a => a.href)"
        ".filter(h => h.includes('colab.research.google.com'));")
    assert colab and all(h.endswith(f"/notebooks/{chapter}.ipynb") for h in colab), colab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{chapter}.png"))


def test_no_internal_link_is_broken(site):
    broken = []
    pages = sorted(site.rglob("*.html"))
    ids = {}
    for page in pages:
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        ids[page] = {el["id"] for el in soup.find_all(id=True)}
        for a in soup.find_all("a", href=True):
            href = a["href"]
            if urlparse(href).scheme or href.startswith(("mailto:", "javascript:")):
                continue
            target, fragment = urldefrag(href)
            path = (page.parent / unquote(target)).resolve() if target else page
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append(f"{page.relative_to(site)} -> {href}")
            elif fragment and path.suffix == ".html":
                ids.setdefault(path, {el["id"] for el in BeautifulSoup(
                    path.read_text(encoding="utf-8"), "html.parser").find_all(id=True)})
                if fragment not in ids[path]:
                    broken.append(f"{page.relative_to(site)} -> {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:20])


def test_the_scorecard_has_a_row_for_every_chapter(site, server, browser):
    browser.get(f"{server}/book/scorecard.html")
    hrefs = browser.execute_script(
        "return Array.from(document.querySelectorAll('table tbody tr td:first-child a'))"
        ".map(a => a.getAttribute('href'));")
    linked = {Path(urlparse(h).path).stem for h in hrefs}
    assert set(CHAPTERS) <= linked, f"chapters missing from the scorecard: {set(CHAPTERS) - linked}"
    verdicts = browser.execute_script(
        "return Array.from(document.querySelectorAll('table'))"
        ".filter(t => (t.querySelector('th') || {}).textContent === 'claim')"
        ".flatMap(t => Array.from(t.querySelectorAll('tbody tr td:nth-child(3)')))"
        ".map(td => td.textContent.trim().toLowerCase());")
    assert verdicts and all(v in ("reproduced", "mixed", "not reproduced") for v in verdicts), verdicts
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "scorecard.png"))
