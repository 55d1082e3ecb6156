"""The streaming server against the in-process stream it wraps, on CPU: first-frame latency and steady
frames per second of one stream through `jobs/serve.py`'s application (HTTP, Serve's proxy, ingress,
replica, multipart JPEG) against `ClipGenerator.stream` in this process with the replica's thread
count; then concurrent streams on one replica (they queue: one stream at a time per replica).
Targets (issue 23): >= 0.8x the in-process frames/s and <= +50 ms to the first frame.

    python bench/serve.py                        # toy arch, random weights, configs/toy_distill.yaml settings
    python bench/serve.py --frames 64 --repeats 5 --concurrent 2
    python bench/serve.py --latent 24         # 9x the work per frame: the transport's share shrinks

Interleaved repeats, medians; ratios are measured in one run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/serve.py` without an install

from pipeline.config import load_config  # noqa: E402
from pipeline.generation import ClipGenerator  # noqa: E402
from pipeline.live import LiveStream  # noqa: E402
from pipeline.models.causal_wan import CausalWanModel  # noqa: E402
from pipeline.models.codec import PatchCodec  # noqa: E402
from pipeline.models.text import TextEncoder  # noqa: E402
from pipeline.models.wan_weights import WAN_CONFIGS  # noqa: E402
from pipeline.streaming import read_parts  # noqa: E402
from tests.browser import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square moving left, fast"


def toy_export(root: Path, arch: str) -> Path:
    torch.manual_seed(0)
    CausalWanModel(**WAN_CONFIGS[arch]).save_pretrained(root / "transformer")
    TextEncoder.toy().save_pretrained(root)
    PatchCodec(4).save_pretrained(root / "codec")
    return root


def in_process(gen: ClipGenerator, frames: int, window: int) -> tuple[float, float]:
    """(ms to the first frame, frames/s after it) of one LiveStream, JPEG-encoded as the server does."""
    from pipeline.streaming import encode_frame

    start = time.perf_counter()
    live = LiveStream(gen, PROMPT, 0, frames // gen.settings.frames_per_block, cache_window=window, sink_frames=1)
    first, count = None, 0
    while not live.done:
        for frame in live.next_frames():
            encode_frame(frame, "jpeg", 90)
            first = first if first is not None else time.perf_counter()
            count += 1
    end = time.perf_counter()
    return (first - start) * 1000, (count - 1) / (end - first)


def served(port: int, frames: int, window: int) -> tuple[float, float, float]:
    """(ms from the request to the first frame, frames/s after it, frames/s as the replica made them:
    its X-Ms headers) of one stream over HTTP."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/streams", json.dumps({"prompt": PROMPT, "frames": frames, "window": window, "sink_frames": 1}),
                       {"Content-Type": "application/json"})
    stream_id = json.loads(connection.getresponse().read())["id"]
    connection.request("GET", f"/v1/streams/{stream_id}")
    reply = connection.getresponse()
    first, count, made = None, 0, []

    def chunks():
        while chunk := reply.read1(65536):
            yield chunk

    for part in read_parts(chunks()):
        if part.headers["content-type"] == "image/jpeg":
            first = first if first is not None else time.perf_counter()
            count += 1
            made.append(float(part.headers["x-ms"]))
    end = time.perf_counter()
    return (first - start) * 1000, (count - 1) / (end - first), (count - 1) / ((made[-1] - made[0]) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="toy")
    parser.add_argument("--frames", type=int, default=48, help="latent frames per stream (past the clip: a window of 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=2, help="streams started at once on one replica")
    parser.add_argument("--latent", type=int, default=8, help="latent height and width (8: the toy world's 32x32 pixels)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from jobs.serve import start

    cpus = 1
    torch.set_num_threads(cpus)  # as the replica's process (Ray sets OMP_NUM_THREADS to its CPUs)
    with tempfile.TemporaryDirectory() as folder:
        export = str(toy_export(Path(folder), args.arch))
        cfg = load_config(str(REPO / "configs" / "toy_distill.yaml"), [
            f"model.student_arch={args.arch}", f"model.latent_height={args.latent}", f"model.latent_width={args.latent}",
            f"serve.port={free_port()}", f"serve.resources={{CPU: {cpus}}}",
            f"serve.max_queued_streams={args.concurrent}", f"serve.max_blocks={args.frames}", "tracking.tracking_uri=none"])
        gen = ClipGenerator.load(export, cfg)
        window = 4
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            start(cfg, export)
            served(cfg.serve.port, args.frames, window)  # warm-up: the replica's first stream
            in_process(gen, args.frames, window)
            local, remote = [], []
            for _ in range(args.repeats):
                local.append(in_process(gen, args.frames, window))
                remote.append(served(cfg.serve.port, args.frames, window))
            median = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
            print(f"{args.arch}, {args.latent}x{args.latent} latents, {args.frames} latent frames per stream, window {window}, "
                  f"{cpus} CPU per replica, {args.repeats} repeats")
            print("| path | first frame (ms) | frames/s after it |")
            print("|---|---|---|")
            print(f"| ClipGenerator in process (LiveStream + JPEG) | {median(local, 0):.1f} | {median(local, 1):.1f} |")
            print(f"| served (HTTP, Serve proxy, ingress, replica) | {median(remote, 0):.1f} | {median(remote, 1):.1f} |")
            print(f"| (the replica's own pace, from its X-Ms headers) | | {median(remote, 2):.1f} |")
            print(f"served / in process: frames/s {median(remote, 1) / median(local, 1):.2f}x (target >= 0.8x), "
                  f"first frame {median(remote, 0) - median(local, 0):+.1f} ms (target <= +50 ms)")

            results: list[tuple[float, float, float]] = []
            threads = [threading.Thread(target=lambda: results.append(served(cfg.serve.port, args.frames, window)))
                       for _ in range(args.concurrent)]
            began = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - began
            firsts = sorted(r[0] for r in results)
            print(f"{args.concurrent} streams at once on 1 replica: all done in {wall:.2f} s, "
                  f"{args.concurrent * args.frames / wall:.1f} frames/s in all; first frames after {', '.join(f'{f:.0f}' for f in firsts)} ms "
                  f"(one stream at a time per replica: the others wait in its queue)")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
