"""The streaming server: a Ray Serve application that streams a one-step student's frames as each block
is made, with a prompt that can change mid-stream, and a page that plays them.

    python jobs/serve.py --checkpoint pipeline/assets/toy_student                # http://127.0.0.1:8000/
    ray job submit --working-dir . -- python jobs/serve.py --checkpoint s3://bucket/export --config configs/wan_1_3b_framewise.yaml

Any checkpoint `jobs/generate.py` accepts; an export's own settings come first, then --config and the
overrides. The HTTP API (JSON errors name their field, with a 4xx status):

    POST   /v1/streams               {"prompt": ..., "seed"?, "frames"?, "window"?, "sink_frames"?} -> 201 {"id": ...}
    GET    /v1/streams/{id}          the frames, multipart JPEG (?format=png), one part per frame, then a JSON part
    POST   /v1/streams/{id}/prompt   {"prompt": ..., "at_block"?}: a block the replica starts within ~50 ms (or that block) on follows it
    GET    /v1/streams/{id}/status   its state and, once finished, its numbers
    DELETE /v1/streams/{id}          stops it after the block being made; the replica takes the next stream

`frames` and `window` count latent frames; a stream longer than the model's clip needs a window (the
KV cache keeps `sink_frames` first frames and the newest ones, so memory stays flat). The server binds
`serve.host` (127.0.0.1 unless told) and, when the variable named by `serve.auth_env` is set, wants
`Authorization: Bearer <token>` on /v1. It runs until Ctrl-C or SIGTERM (`ray job stop`), then shuts
the application down; `--detach` leaves it running (`serve shutdown` stops it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import threading
from importlib.resources import files
from typing import Any

# Torch, Ray and the models load inside the functions (as in jobs/generate.py): a bad flag or a missing
# checkpoint is reported in a second.
from jobs.cli import run_main
from pipeline.config import Config, load_config

APP_NAME = "oneforce-stream"


def limits(cfg: Config) -> dict[str, int]:
    from pipeline.generation import GenerationSettings

    settings = GenerationSettings.from_config(cfg)
    return {"max_prompt_chars": cfg.generate.max_prompt_chars, "max_blocks": cfg.serve.max_blocks,
            "frames_per_block": settings.frames_per_block, "clip_blocks": settings.num_blocks,
            "cache_window": settings.cache_window or 0, "sink_frames": settings.sink_frames}


def build_app(cfg: Config, checkpoint: str, token: str = ""):
    """The Serve application: ingress, registry and replicas, bound with the config's options."""
    from actors.streaming import StreamIngress, StreamRegistry, StreamReplica
    from pipeline.planning import ray_resources

    s = cfg.serve
    replicas: dict[str, Any] = {"num_replicas": s.num_replicas}
    if s.max_replicas > s.num_replicas:
        replicas = {"autoscaling_config": {"min_replicas": s.num_replicas, "max_replicas": s.max_replicas,
                                           "target_ongoing_requests": 1, "upscale_delay_s": s.upscale_delay_s,
                                           "downscale_delay_s": s.downscale_delay_s}}
    registry = StreamRegistry.bind(s.max_streams_per_client)
    replica = StreamReplica.options(
        **replicas, max_queued_requests=s.max_queued_streams * max(s.num_replicas, s.max_replicas),
        ray_actor_options=ray_resources(s.resources),
    ).bind(checkpoint, cfg.to_dict(), registry)
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else ""  # the token itself stays in the driver
    page = files("pipeline").joinpath("assets/serve.html").read_text()
    return StreamIngress.bind(registry, replica, limits(cfg), token_sha256, page)


def start(cfg: Config, checkpoint: str) -> str:
    """Deploy on the connected Ray cluster; returns the server's URL once every replica is up."""
    from ray import serve

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, checkpoint, os.environ.get(cfg.serve.auth_env, "")), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}/"


def main(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.storage import check_exists

    # check_checkpoint asks this too, but only after importing torch and the model code (~2 s): a
    # mistyped path is reported before them.
    check_exists(args.checkpoint, "--checkpoint")
    from pipeline.checkpoint import export_settings
    from pipeline.failures import init_ray
    from pipeline.models.loading import check_checkpoint

    check_checkpoint(args.checkpoint, cfg.model.student_arch)  # layout and shapes
    settings = export_settings(args.checkpoint)
    if settings:  # what the student was trained with, under the user's --config and overrides
        cfg = load_config(args.config, args.overrides, base=settings)
    init_ray(cfg.ray.address)
    url = start(cfg, args.checkpoint)
    print(f"streaming {args.checkpoint} at {url} (API: {url}v1/streams)", flush=True)
    if args.detach:
        return
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: stopped.set())
    try:
        stopped.wait()
    finally:
        from ray import serve

        serve.delete(APP_NAME)
    print("stopped: the application is deleted", flush=True)


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="student directory (diffusers layout) or weights file, local or s3://")
    parser.add_argument("--detach", action="store_true", help="deploy and return; the application keeps running")


def check(cfg: Config, args: argparse.Namespace) -> None:
    """--dry-run: the checkpoint's layout and shapes, and the text encoder and codec it would fall back to."""
    from pipeline.models.loading import check_generation_inputs

    check_generation_inputs(args.checkpoint, cfg.model)


if __name__ == "__main__":
    run_main(main, __doc__.splitlines()[0], extra_args, check=check)
