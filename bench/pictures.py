"""The README's pictures, regenerated from real outputs (issue 13).

    python bench/pictures.py strip        # docs/strip.png: teacher vs one-step student vs DMD-only, same prompts and noise
    python bench/pictures.py mlflow       # docs/mlflow_distill.png: the MLflow UI on the quickstart's store
    python bench/pictures.py serve        # docs/serve.png: the streaming page playing the shipped toy student
    python bench/pictures.py all --store /tmp/qs-src/runs/quickstart/mlflow.db

`strip` reads the clips bench/claims.py graded (runs/claims/videos/: the teacher's multi-step sampler, the
One-Forcing and the DMD-only students of one seed, all from noise seed 777) and lays out, for a few
prompts that differ in colour, shape, direction and speed, one row per model and one column per frame (4x nearest upscaling).

`mlflow` starts a real `mlflow ui` on the quickstart's store (runs/quickstart/mlflow.db unless --store),
opens the distillation run's metric charts in headless Chromium (the Debian `chromium` package), driven
over the DevTools protocol (tests/browser.py: aiohttp's websocket, which Ray installs) so it can wait for
the charts to draw, saves a screenshot and stops the browser and the server.

`serve` starts jobs/serve.py's application on a local Ray over a student export (the shipped toy student
unless --checkpoint), starts a stream from its page and takes the screenshot while frames arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def screenshot(store_file: Path, experiment: str, out: Path, width: int, height: int, wait_s: float) -> Path:
    from tests.browser import Page, free_port

    store = f"sqlite:///{store_file.resolve()}"
    experiment_id, run_id = distill_run(store, experiment)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
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
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
        with Page(width, height) as page:
            page.open(url)
            # The charts fetch their data after the page loads: wait until their count holds for 3 s.
            deadline, charts, steady = time.time() + wait_s, 0, 0
            while time.time() < deadline and steady < 3:
                time.sleep(1)
                now = page.evaluate(CHARTS) or 0
                steady = steady + 1 if now and now == charts else 0
                charts = now
            print(f"assistant panel: {page.evaluate(CLOSE_ASSISTANT)}")
            time.sleep(3)  # the layout after the panel closed; the charts redraw to the new width
            page.screenshot(out)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"wrote {out}: MLflow UI ({store}) run {run_id}, {charts} charts drawn, {url.replace(base, '')}")
    return out


# ----------------------------------------------------------------------------------------------------
# The streaming page
# ----------------------------------------------------------------------------------------------------


def serve_page(checkpoint: str, prompt: str, out: Path, frames: int, shown_after: int) -> Path:
    """jobs/serve.py's application on a local Ray, its page in headless Chromium: a stream of `frames`
    latent frames started from the page, the screenshot taken once `shown_after` frames are painted."""
    import ray
    from ray import serve

    from jobs.serve import start
    from pipeline.checkpoint import export_settings
    from pipeline.config import load_config
    from tests.browser import Page, free_port

    cfg = load_config(None, [f"serve.port={free_port()}", "serve.resources={CPU: 1}", f"serve.max_blocks={frames}",
                             "tracking.tracking_uri=none"], base=export_settings(checkpoint))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start(cfg, checkpoint)
        fill = "; ".join(f"document.getElementById('{key}').value = {json.dumps(str(value))}"
                         for key, value in {"prompt": prompt, "frames": frames, "window": 6, "seed": 0}.items())
        with Page(900, 620) as page:
            page.open(url)
            page.wait_for("document.readyState === 'complete' && !!document.getElementById('start')", 60)
            page.evaluate(f"{fill}; document.getElementById('start').click(); true")
            painted = page.wait_for(f"Number(document.getElementById('count').textContent) >= {shown_after} && "
                                    "document.getElementById('count').textContent", 300)
            page.screenshot(out)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"wrote {out}: the streaming page, {painted} frames painted of {frames}, {checkpoint}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("strip", "mlflow", "serve", "all"))
    parser.add_argument("--videos", default="runs/claims/videos", help="bench/claims.py's clips")
    parser.add_argument("--seed", type=int, default=0, help="which training seed's students")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--strip-out", default="docs/strip.png")
    parser.add_argument("--store", default="runs/quickstart/mlflow.db", help="the quickstart's MLflow store (SQLite file)")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--mlflow-out", default="docs/mlflow_distill.png")
    parser.add_argument("--size", default="1400x1300", help="browser window, WxH")
    parser.add_argument("--wait", type=float, default=90, help="at most this many seconds for the charts to draw")
    parser.add_argument("--checkpoint", default="pipeline/assets/toy_student", help="the student the streaming page shows")
    parser.add_argument("--serve-out", default="docs/serve.png")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.what in ("strip", "all"):
        strip(Path(args.videos), args.seed, args.prompts, Path(args.strip_out))
    if args.what in ("mlflow", "all"):
        width, height = (int(v) for v in args.size.split("x"))
        screenshot(Path(args.store), args.experiment, Path(args.mlflow_out), width, height, args.wait)
    if args.what in ("serve", "all"):
        serve_page(args.checkpoint, "a red square moving left, fast", Path(args.serve_out), frames=120, shown_after=40)


if __name__ == "__main__":
    main()
