"""ComfyUI's own web frontend (`comfyui-frontend-package`, GPL: the user's optional install, never bundled) served by
`imagesmith serve --comfy-frontend` under /comfy/, in headless Chromium: it loads without errors, its default graph
is queued against the tiny model, the image appears, and the frontend finds the prompt in its history. Two
versions: 1.28.8 (installed in the venv; reads /history and /queue) and 1.44.19 (the newest the issue's range
allows, served with --comfy-frontend-root from the folder `make` installs it to; reads only /api/jobs). Skips
where a frontend, Playwright or Debian's chromium is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
NEWER = Path(__file__).resolve().parents[2] / ".venv" / "frontends" / "1.44.19" / "comfyui_frontend_package" / "static"
playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")

SETUP = """() => {
  for (const n of app.graph._nodes) {
    const w = name => n.widgets.find(x => x.name === name);
    if (n.type === 'CheckpointLoaderSimple') w('ckpt_name').value = 'tiny-sd15';
    if (n.type === 'EmptyLatentImage') { w('width').value = 64; w('height').value = 64; }
    if (n.type === 'KSampler') { w('steps').value = 2; }
  }
  return app.graph._nodes.map(n => n.type).sort();
}"""


@pytest.mark.parametrize("frontend", ["installed", "1.44.19"])
def test_comfyuis_frontend_queues_its_default_graph(frontend, tiny_home, tmp_path_factory):
    from fixtures.live import live_server
    if frontend == "installed":
        pytest.importorskip("comfyui_frontend_package")
        served = True
    else:
        if not (NEWER / "index.html").is_file():
            pytest.skip(f"comfyui-frontend-package {frontend} is not installed at {NEWER} (make install puts it there)")
        served = NEWER
    with live_server(tiny_home, tmp_path_factory.mktemp("comfy-fe"), comfy_frontend=served) as (url, store, home), \
            playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors, failed = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 500 else None)
            # 404s: only for the user files ComfyUI itself answers 404 to until they exist (user.css, saved
            # workflows, subgraphs, template settings); any other is a route the frontend needs and we lack
            missing = []
            page.on("response", lambda r: missing.append(r.url) if r.status == 404 and "/userdata" not in r.url
                    else None)
            import httpx
            httpx.post(f"{url}/settings", json={"Comfy.TutorialCompleted": True})  # a returning user: no tour
            page.goto(f"{url}/comfy/")
            page.wait_for_function("() => window.app && app.graph && app.graph._nodes.length >= 7", timeout=90000)
            types = page.evaluate(SETUP)
            assert types == sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage",
                                    "KSampler", "VAEDecode", "SaveImage"])  # the classic default graph
            page.evaluate("() => app.queuePrompt(0, 1)")
            # the WebSocket's `executed` reaches the frontend's output store ...
            page.wait_for_function("() => Object.values(app.nodeOutputs || {}).some(o => o.images && o.images.length)",
                                   timeout=120000)
            # ... and the image loads from the URL the frontend builds for it
            size = page.evaluate("""async () => {
              const out = Object.values(app.nodeOutputs).find(o => o.images).images[0];
              const im = new Image();
              im.src = app.api.apiURL('/view?' + new URLSearchParams(out));
              await im.decode();
              return [im.naturalWidth, im.naturalHeight];
            }""")
            assert size == [64, 64]
            page.screenshot(path=str(home / "comfy-frontend.png"))
            dialogs = page.locator(".p-dialog-mask .p-dialog")
            assert dialogs.count() == 0, dialogs.first.inner_text()
            # the frontend's own start-up slip (a setting's onChange sets one not yet registered) is not ours
            ours = [e for e in errors if "reading 'id'" not in e]
            assert ours == [] and failed == [] and missing == []
            jobs = store.list(limit=10)[0]
            assert [j["status"] for j in jobs if j["type"] == "comfy"] == ["succeeded"]
            # the queue and history panels' calls (1.28: /queue and /history; 1.44: /api/jobs)
            seen = page.evaluate("""async () => {
              const q = await app.api.getQueue();
              const h = await app.api.getHistory();
              const items = Array.isArray(h) ? h : h.History;
              return [q.Running.length + q.Pending.length, items.map(x => x.id || x.prompt[1])];
            }""")
            assert seen == [0, [j["id"] for j in jobs if j["type"] == "comfy"]]
        finally:
            browser.close()
