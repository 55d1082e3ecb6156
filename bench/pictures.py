"""The README's pictures, regenerated from real outputs (issue 13).

    python bench/pictures.py strip        # docs/strip.png: teacher vs one-step student vs DMD-only, same prompts and noise
    python bench/pictures.py mlflow       # docs/mlflow_distill.png: the MLflow UI on the quickstart's store
    python bench/pictures.py all --store /tmp/qs-src/runs/quickstart/mlflow.db

`strip` reads the clips bench/claims.py graded (runs/claims/videos/: the teacher's multi-step sampler, the
One-Forcing and the DMD-only students of one seed, all from noise seed 777) and lays out, for a few
prompts that differ in colour, shape, direction and speed, one row per model and one column per frame (4x nearest upscaling).

`mlflow` starts a real `mlflow ui` on the quickstart's store (runs/quickstart/mlflow.db unless --store),
opens the distillation run's metric charts in headless Chromium (the Debian `chromium` package), driven
over the DevTools protocol (aiohttp's websocket, which Ray installs) so it can wait for the charts to draw,
saves a screenshot and stops the browser and the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/pictures.py` without an install

REPO = Path(__file__).resolve().parents[1]
ROWS = (("teacher", "teacher, 25 steps"), ("oneforce-s{seed}", "One-Forcing, 1 step"), ("dmd-s{seed}", "DMD only, 1 step"))


# ----------------------------------------------------------------------------------------------------
# The strip
# ----------------------------------------------------------------------------------------------------


def manifest(videos: Path) -> dict[str, Path]:
    rows = [json.loads(line) for line in (videos / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {row["prompt"]: videos / row["path"] for row in rows}


def varied(prompts: list[str], count: int) -> list[str]:
    """`count` prompts that share as few words as possible (colour, shape, direction, speed), in file order
    on ties: the strip shows the grammar, not four circles moving up."""
    chosen: list[str] = []
    for _ in range(min(count, len(prompts))):
        used = {word for prompt in chosen for word in prompt.replace(",", "").split()}
        rest = [p for p in prompts if p not in chosen]
        chosen.append(max(rest, key=lambda p: len(set(p.replace(",", "").split()) - used)))
    return chosen


def strip(videos: Path, seed: int, prompts: int, out: Path, scale: int = 4) -> Path:
    from PIL import Image, ImageDraw

    from pipeline.samples import frame_strip
    from pipeline.video import read_video

    models = [(manifest(videos / folder.format(seed=seed)), label) for folder, label in ROWS]
    common = [p for p in models[0][0] if all(p in m for m, _ in models[1:])]
    if not common:
        raise SystemExit(f"no prompt is in all of {', '.join(f.format(seed=seed) for f, _ in ROWS)} under {videos}")
    chosen = varied(common, prompts)
    label_width, header = 170, 18
    blocks = []
    for prompt in chosen:
        clips = np.stack([read_video(m[prompt]) for m, _ in models])  # (3, T, H, W, 3) in [0, 1]
        image = frame_strip(clips)
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas = Image.new("RGB", (label_width + image.shape[1], header + image.shape[0]), "white")
        canvas.paste(Image.fromarray(image), (label_width, header))
        draw = ImageDraw.Draw(canvas)
        draw.text((label_width, 3), f'"{prompt}" (noise seed 777)', fill="black")
        row_height = image.shape[0] / len(models)
        for i, (_, label) in enumerate(models):
            draw.text((6, header + row_height * (i + 0.5) - 6), label, fill="black")
        blocks.append(canvas)
    gap = 10
    sheet = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + gap * (len(blocks) - 1)), "white")
    y = 0
    for block in blocks:
        sheet.paste(block, (0, y))
        y += block.height + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}: {len(chosen)} prompts x (teacher, One-Forcing seed {seed}, DMD-only seed {seed}) from {videos}")
    return out


# ----------------------------------------------------------------------------------------------------
# The MLflow screenshot
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_run(store: str, experiment: str) -> tuple[str, str]:
    import mlflow

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"{store}: no experiment '{experiment}'")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if r.info.run_name.startswith("distill")]
    if not runs:
        raise SystemExit(f"{store}: no distill run in experiment '{experiment}'")
    return exp.experiment_id, runs[0].info.run_id


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no headless Chromium found: apt-get install -y chromium")


CLOSE_ASSISTANT = """(() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let title = null;
  while (walker.nextNode()) if (walker.currentNode.nodeValue.trim() === 'MLflow Assistant') { title = walker.currentNode.parentElement; break; }
  let header = title;
  while (header && header.querySelectorAll('button').length < 3) header = header.parentElement;
  if (!header) return 'no assistant panel';
  const buttons = [...header.querySelectorAll('button')];
  const close = buttons.find(b => /close/i.test(b.getAttribute('aria-label') || '')) || buttons[buttons.length - 1];
  close.click();
  return 'closed: ' + (close.getAttribute('aria-label') || close.outerHTML.slice(0, 80));
})()"""
CHARTS = "document.querySelectorAll('.js-plotly-plot').length"


async def capture(cdp_port: int, url: str, out: Path, width: int, height: int, wait_s: float) -> int:
    """Chrome DevTools Protocol over a websocket (aiohttp, which Ray brings): size the page, open `url`,
    wait in real time until the metric charts are drawn (they fetch their data after the page loads),
    close the assistant side panel, screenshot. Returns how many charts were drawn."""
    import asyncio
    import base64

    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(60):
            try:
                async with http.get(f"http://127.0.0.1:{cdp_port}/json/list") as reply:
                    pages = [t for t in await reply.json() if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
        else:
            raise SystemExit("headless Chromium did not open a page")
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = 0

            async def call(method: str, **params):
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": method, "params": params})
                async for message in ws:
                    reply = message.json()
                    if reply.get("id") == counter:
                        if "error" in reply:
                            raise RuntimeError(f"{method}: {reply['error']}")
                        return reply["result"]

            async def evaluate(expression: str):
                return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            await call("Page.navigate", url=url)
            deadline, charts, steady = time.time() + wait_s, 0, 0
            while time.time() < deadline and steady < 3:  # the count unchanged for 3 s
                await asyncio.sleep(1)
                now = await evaluate(CHARTS) or 0
                steady = steady + 1 if now and now == charts else 0
                charts = now
            print(f"assistant panel: {await evaluate(CLOSE_ASSISTANT)}")
            await asyncio.sleep(3)  # the layout after the panel closed; the charts redraw to the new width
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
            return charts


def screenshot(store_file: Path, experiment: str, out: Path, width: int, height: int, wait_s: float) -> Path:
    import asyncio
    import tempfile

    store = f"sqlite:///{store_file.resolve()}"
    experiment_id, run_id = distill_run(store, experiment)
    browser = chromium()
    port, cdp_port = free_port(), free_port()
    processes = []
    with tempfile.TemporaryDirectory() as profile:
        try:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            processes.append(server)
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit(f"mlflow ui did not start on port {port}") from None
                    time.sleep(1)
            processes.append(subprocess.Popen(
                [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--remote-debugging-port={cdp_port}", f"--window-size={width},{height}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))
            url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
            out.parent.mkdir(parents=True, exist_ok=True)
            charts = asyncio.run(capture(cdp_port, url, out, width, height, wait_s))
        finally:
            for process in reversed(processes):  # each started in its own process group, with its children
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
    print(f"wrote {out}: MLflow UI ({store}) run {run_id}, {charts} charts drawn, {url.replace(base, '')}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("strip", "mlflow", "all"))
    parser.add_argument("--videos", default="runs/claims/videos", help="bench/claims.py's clips")
    parser.add_argument("--seed", type=int, default=0, help="which training seed's students")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--strip-out", default="docs/strip.png")
    parser.add_argument("--store", default="runs/quickstart/mlflow.db", help="the quickstart's MLflow store (SQLite file)")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--mlflow-out", default="docs/mlflow_distill.png")
    parser.add_argument("--size", default="1400x1300", help="browser window, WxH")
    parser.add_argument("--wait", type=float, default=90, help="at most this many seconds for the charts to draw")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.what in ("strip", "all"):
        strip(Path(args.videos), args.seed, args.prompts, Path(args.strip_out))
    if args.what in ("mlflow", "all"):
        width, height = (int(v) for v in args.size.split("x"))
        screenshot(Path(args.store), args.experiment, Path(args.mlflow_out), width, height, args.wait)


if __name__ == "__main__":
    main()
