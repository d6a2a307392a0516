"""Screenshots of the MLflow UI for the README, taken with headless Chromium over the DevTools protocol.

    sct-sweep ui <sweep> &      # prints the sweep's runs page, e.g. http://127.0.0.1:5000/#/experiments/1
    python scripts/mlflow_screenshots.py http://127.0.0.1:5000/#/experiments/1 docs/img \
        --group-by sct.axis.sct.ref_batch --run <run id>

Writes `mlflow_runs.png` (the runs table: the sweep's parent run with its trials nested), `mlflow_grouped.png`
(runs grouped by a swept axis's tag, charts of the groups) and, given a run, `mlflow_images.png` (its
sample grids with the step slider). Needs /usr/bin/chromium (scripts/install_chromium.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        return res.get("result", {}).get("value")

    async def wait_text(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} did not appear on the page")
            await asyncio.sleep(0.5)

    async def click_text(self, text: str, selector: str = "button, [role=menuitem], [role=option], span") -> bool:
        """Click, as a mouse does (menus open on pointer-down), the last element matching `selector` whose
        text is exactly `text`."""
        box = await self.js(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})]
              .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
            const el = els[els.length - 1]; if (!el) return null; el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if not box:
            return False
        await self.click_xy(*box)
        return True

    async def type_into(self, placeholder: str, text: str) -> None:
        """Type `text` into the input whose placeholder is `placeholder`."""
        query = f"input[placeholder={json.dumps(placeholder)}]"
        box = await self.js(f"""(() => {{ const el = document.querySelector({json.dumps(query)});
            if (!el) return null; const r = el.getBoundingClientRect(); return [r.x + 20, r.y + r.height / 2]; }})()""")
        if box:
            await self.click_xy(*box)
            await self.call("Input.insertText", text=text)
            await asyncio.sleep(2)

    async def click_xy(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.sleep(0.5)

    async def shot(self, path: Path) -> None:
        await asyncio.sleep(1.5)  # charts animate in
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"wrote {path}")


def start_chromium(profile: Path, port: int) -> subprocess.Popen:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
           "--window-size=1500,900", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                tabs = [t for t in json.loads(r.read()) if t["type"] == "page"]
            if tabs:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("chromium did not start")


async def take(url: str, out: Path, group_by: str | None, run: str | None, port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
        ws_url = next(t for t in json.loads(r.read()) if t["type"] == "page")["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        await page.call("Emulation.setDeviceMetricsOverride", width=1500, height=900, deviceScaleFactor=1,
                        mobile=False)
        await page.call("Page.navigate", url=url)
        await page.wait_text("-sweep")
        await asyncio.sleep(2)
        await page.js("document.querySelector('button[aria-label=\"Close\"]')?.click()")  # the assistant panel
        await page.js("document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]')?.click()")
        await page.shot(out / "mlflow_runs.png")  # the parent run expanded: its trials nested under it
        if group_by:
            await page.js("document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]')?.click()")
            await page.click_text("Group by", "button")
            await page.click_text(group_by, "[role=menu] *")
            await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape",
                            windowsVirtualKeyCode=27)
            await page.shot(out / "mlflow_grouped.png")
            await page.js("location.hash = location.hash.split('?')[0] + '?compareRunsMode=CHART'")
            await asyncio.sleep(3)
            await page.type_into("Search metric charts", "fid_")
            await page.shot(out / "mlflow_grouped_charts.png")
        if run:
            await page.call("Page.navigate", url=f"{url.split('?')[0].rstrip('/')}/{run}/model-metrics")
            await asyncio.sleep(5)
            await page.type_into("Search metric charts", "samples_1step")
            await page.js("document.querySelector('button[data-component-id$=\"fullscreen_button_chartcard\"]')"
                          "?.click()")  # the card full screen: the grid under the run's settings
            await asyncio.sleep(5)  # the images load after their cards
            await page.js("document.querySelector('[role=dialog] img')?.scrollIntoView({block: 'end'})")
            await page.shot(out / "mlflow_images.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the sweep's runs page, as `sct-sweep ui` prints it")
    ap.add_argument("out", type=Path, help="folder for the PNGs (docs/img)")
    ap.add_argument("--group-by", help="tag to group runs by, e.g. sct.axis.sct.ref_batch")
    ap.add_argument("--run", help="a trial's run id: screenshot its sample images")
    ap.add_argument("--port", type=int, default=9333, help="Chromium's DevTools port")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    proc = start_chromium(profile, args.port)
    try:
        asyncio.run(take(args.url, args.out, args.group_by, args.run, args.port))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
