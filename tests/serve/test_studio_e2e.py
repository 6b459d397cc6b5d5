"""The web studio end to end in headless Chromium (Debian's chromium driven by Playwright): generate an image and
see it with its metadata, make an ad and download its zip, cancel a running job from the queue tab.

A real server (uvicorn on a free loopback port) and a real worker thread run on the tiny models; skipped where
Playwright or /usr/bin/chromium is missing (`.ci/run` installs chromium when it can)."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def server(tiny_home, tmp_path_factory):
    from fixtures.live import live_server
    with live_server(tiny_home, tmp_path_factory.mktemp("studio-e2e")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, accept_downloads=True)  # a phone
    pg = context.new_page()
    yield pg
    context.close()


def test_generate_shows_the_image_with_its_metadata(server, page):
    url, _, _ = server
    page.goto(url + "/")
    page.wait_for_selector("#gen-model option[value='tiny-sd15']", state="attached")
    page.select_option("#gen-model", "tiny-sd15")
    page.fill("textarea[name=prompt]", "a red apple, 빨간 사과")
    page.fill("input[name=steps]", "3")
    page.fill("input[name=seed]", "17")
    page.fill("input[name=width]", "64")
    page.fill("input[name=height]", "64")
    page.click("#gen-form button.go")
    img = page.wait_for_selector("#gen-out img", timeout=60_000)
    assert page.inner_text("#gen-out figcaption") == "seed 17"
    img.click()
    text = page.inner_text("#detail-body pre")
    assert "a red apple, 빨간 사과" in text and "Steps: 3" in text and "Seed: 17" in text
    shown = page.evaluate("() => { const i = document.querySelector('#detail-body img'); "
                          "return [i.complete, i.naturalWidth, i.naturalHeight]; }")
    assert shown == [True, 64, 64]


def test_ad_studio_makes_an_ad_and_the_zip_downloads(server, page, tmp_path):
    url, _, _ = server
    product = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    product.paste((200, 40, 40, 255), (40, 30, 120, 140))
    product.save(tmp_path / "product.png")
    page.goto(url + "/#ad")
    page.set_input_files("#ad-form input[name=product]", str(tmp_path / "product.png"))
    page.fill("#ad-form input[name=headline]", "새로운 시작")
    for box in page.query_selector_all("#ad-formats input"):
        if box.get_attribute("value") != "300x250":
            box.uncheck()
        else:
            box.check()
    page.click("#ad-form button.go")
    link = page.wait_for_selector("#ad-out a[download]", timeout=120_000)
    assert page.query_selector("#ad-out img") is not None
    with page.expect_download() as info:
        link.click()
    path = info.value.path()
    with zipfile.ZipFile(path) as z:
        pngs = [n for n in z.namelist() if n.endswith(".png") and "background" not in n]
        assert pngs and Image.open(io.BytesIO(z.read(pngs[0]))).size == (300, 250)


def test_drag_a_box_around_the_product_and_see_the_cutout(server, page, tmp_path):
    """A busy photo: the user drags a box on the picker (a phone screen: the photo is shown smaller than it is);
    the cut-out job gets the box in the photo's own pixels and the studio shows the cut-out and its confidence."""
    url, store, _ = server
    photo = Image.new("RGB", (800, 600), (128, 128, 128))
    photo.paste((200, 40, 40), (420, 200, 620, 480))   # the product
    photo.paste((30, 60, 200), (0, 50, 250, 580))      # a distractor cut by the frame
    photo.save(tmp_path / "busy.jpg")
    page.goto(url + "/#ad")
    page.set_input_files("#ad-form input[name=product]", str(tmp_path / "busy.jpg"))
    canvas = page.wait_for_selector("#ad-pick-canvas", state="visible")
    r = canvas.bounding_box()
    k = r["width"] / 800  # screen px per photo px
    page.mouse.move(r["x"] + 400 * k, r["y"] + 180 * k)
    page.mouse.down()
    page.mouse.move(r["x"] + 520 * k, r["y"] + 330 * k, steps=4)
    page.mouse.move(r["x"] + 640 * k, r["y"] + 500 * k, steps=4)
    page.mouse.up()
    assert page.text_content("#ad-pick-state").startswith("box ")
    page.click("#ad-pick-check")
    page.wait_for_selector("#ad-mask-img[src^='blob:']", timeout=120_000)
    assert "cut-out confidence" in page.text_content("#ad-pick-state")
    jobs = [j for j in store.list(limit=50)[0] if j["type"] == "cutout"]
    x0, y0, x1, y1 = max(jobs, key=lambda j: j["created_at"])["request"]["product_box"]
    assert abs(x0 - 400) <= 3 / k and abs(y0 - 180) <= 3 / k and abs(x1 - 640) <= 3 / k and abs(y1 - 500) <= 3 / k


def test_cancel_a_running_job_from_the_queue_tab(server, page):
    url, store, _ = server
    job, _ = store.submit("generate", {"prompt": "a long one", "model": "tiny-sd15", "steps": 150, "width": 256,
                                    "height": 256, "batch_count": 8, "seed": 1})
    for _ in range(200):  # wait until the worker runs it
        if store.get(job["id"])["status"] == "running":
            break
        time.sleep(0.05)
    page.goto(url + "/#queue")
    row = page.wait_for_selector(f"#queue-table tr:has-text('{job['id'][:8]}') button", timeout=30_000)
    row.click()
    for _ in range(400):
        if store.get(job["id"])["status"] == "canceled":
            break
        time.sleep(0.05)
    assert store.get(job["id"])["status"] == "canceled"


def test_pause_and_resume_the_queue_from_the_queue_tab(server, page):
    url, store, _ = server
    page.goto(url + "/#queue")
    page.wait_for_selector("#queue-toggle:has-text('Pause queue')", timeout=30_000).click()
    page.wait_for_selector("#queue-state:has-text('Paused by local')", timeout=30_000)
    assert store.queue_state()["paused"] is True
    page.click("#queue-toggle:has-text('Resume queue')")
    page.wait_for_selector("#queue-toggle:has-text('Pause queue')", timeout=30_000)
    assert store.queue_state()["paused"] is False
