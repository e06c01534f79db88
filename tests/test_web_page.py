"""The web page in a real headless Chromium (Debian `chromium` + pip `playwright`, no downloads).

Served by uvicorn on a loopback port from the contract FakeSearcher, whose grounding is known
(image i holds its colour word at cell i and its animal at cell i+1), so the heat map the page
draws can be checked cell by cell.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SERVICE_TEST_CHROMIUM", "/usr/bin/chromium")


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the dev extra has it)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    except Exception as e:  # a browser that cannot start here (missing libraries, no /dev/shm)
        pw.stop()
        pytest.skip(f"Chromium at {CHROMIUM} cannot be launched: {str(e).splitlines()[0]}")
    return pw, browser


def _serve(tmp: Path, **settings):
    """The FakeSearcher's app under uvicorn on a loopback port, for the module's tests."""
    import uvicorn

    from service.app import create_app
    from fakes import FakeSearcher
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(index_dir=tmp / "idx", **settings), searcher=FakeSearcher(tmp / "idx", n_images=8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", tmp
    srv.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def page(server):
    pw, browser = _browser_or_skip()
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server[0] + "/")
    yield pg
    assert not errors, f"JavaScript errors on the page: {errors}"
    ctx.close()
    browser.close()
    pw.stop()


def _screenshot(pg, name: str, tmp: Path) -> None:
    path = tmp / name
    pg.screenshot(path=str(path), full_page=False)
    keep = os.environ.get("SERVICE_WEB_SCREENSHOTS")  # a folder to keep them in, for a human look
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


def test_text_search_shows_grid_scores_and_grounding(page, server):
    page.wait_for_function("document.getElementById('index-info').textContent.includes('generation 1')")
    page.fill("#query", "red dog")
    page.press("#query", "Enter")
    page.wait_for_selector(".card")
    cards = page.locator(".card")
    assert cards.count() == 8
    assert "score" in cards.first.locator(".scores").inner_text()
    assert "results" in page.inner_text("#status") and "re-rank" in page.inner_text("#status")
    # every result image loads from /images/{id}
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")

    card = page.locator('.card[data-id="0"]')
    heat = card.locator(".heat")
    assert heat.evaluate("e => getComputedStyle(e).opacity") == "0"  # hidden until hover
    card.locator(".thumb").hover()
    page.wait_for_function("e => getComputedStyle(e).opacity === '1'", arg=heat.element_handle())
    active = card.locator('.heat .cell[data-active="1"]')
    assert sorted(int(c) for c in active.evaluate_all("els => els.map(e => e.dataset.cell)")) == [0, 1]
    assert card.locator('.heat .cell[data-cell="0"]').inner_text() == "red"
    assert card.locator('.heat .cell[data-cell="1"]').inner_text() == "dog"
    assert card.locator(".heat .cell").count() == 16  # the 4x4 grid
    _screenshot(page, "hover.png", server[1])

    card.locator(".word", has_text="dog").hover()  # one word: only its cell lights up
    active = card.locator('.heat .cell[data-active="1"]')
    assert active.evaluate_all("els => els.map(e => e.dataset.cell)") == ["1"]
    assert "dog" in card.locator(".cell-label").inner_text()
    card.locator(".word", has_text="dog").click()  # click pins the card
    assert "pinned" in (card.get_attribute("class") or "")
    _screenshot(page, "word.png", server[1])


def test_image_drop_zone_finds_captions(page, server):
    img = server[1] / "idx" / "images" / "a3.jpg"
    with page.expect_response("**/search/image") as resp:
        page.set_input_files("#file", str(img))
    assert resp.value.status == 200
    page.wait_for_function("document.getElementById('status').textContent.includes('results')")
    captions = page.locator(".card .caption").all_inner_texts()
    fake_captions = {h["caption"] for h in resp.value.json()["hits"]}
    assert captions and set(captions) == fake_captions and all(" " in c for c in captions)
    assert page.locator("#query-preview img").count() == 1
    _screenshot(page, "image.png", server[1])
    page.check("#target-images")
    with page.expect_response("**/search/image") as resp:  # the same file again: similar images
        page.set_input_files("#file", str(img))
    assert all(h["kind"] == "image" for h in resp.value.json()["hits"])
    page.wait_for_function("document.querySelectorAll('.card .caption')[0].textContent.includes('image')")
    page.uncheck("#target-images")


def test_errors_are_shown(page):
    page.fill("#query", "")
    page.press("#query", "Enter")
    assert "error" in (page.get_attribute("#status", "class") or "")
    page.fill("#query", "dog")
    page.select_option("#k", "100")
    page.evaluate("document.getElementById('query').removeAttribute('maxlength')")
    page.fill("#query", "x" * 600)  # past the service's 512-character limit: the API's 422 message is shown
    page.press("#query", "Enter")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "too long" in page.inner_text("#status")


KEY = "page-key-7f3"


def test_with_a_key_the_page_sends_it_in_a_header_only(page, tmp_path):
    """With SERVICE_API_KEY set: the page asks for the key, then searches and loads every result
    image with it in the X-API-Key header (blob URLs), never in a URL."""
    serve = _serve(tmp_path, api_key=KEY)
    url, _ = next(serve)
    ctx = page.context.browser.new_context()  # the module's browser, a fresh profile (no stored key)
    try:
        pg = ctx.new_page()
        urls: list[str] = []
        pg.on("request", lambda r: urls.append(r.url))
        pg.goto(url + "/")
        pg.wait_for_function("document.getElementById('index-info').textContent.startsWith('index')")
        pg.fill("#query", "red dog")
        pg.press("#query", "Enter")
        pg.wait_for_function("!document.getElementById('key-label').hidden")  # the 401 asks for the key
        pg.fill("#api-key", KEY)
        pg.dispatch_event("#api-key", "change")
        pg.press("#query", "Enter")
        pg.wait_for_selector(".card")
        pg.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
        assert all(src.startswith("blob:") for src in pg.locator(".card img").evaluate_all("e => e.map(i => i.src)"))
        assert any("/images/" in u for u in urls) and not [u for u in urls if KEY in u]
    finally:
        ctx.close()
        next(serve, None)
