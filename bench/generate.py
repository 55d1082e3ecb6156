"""Generation speed of a toy-sized student on CPU: one step vs four steps per block, framewise vs
chunkwise, time per clip and latency to the first frames. Ratios are measured in one run, interleaved
(medians); absolute times are context only.

    python bench/generate.py                 # toy arch (2.4M params), 9 latent frames of 8x8, 7 repeats
    python bench/generate.py --arch toy-debug --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.generation import ClipGenerator
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.codec import PatchCodec
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS

VARIANTS = {
    "framewise 1-step": ["model.frames_per_block=1", "method.denoising_steps=[1000]"],
    "framewise 4-step": ["model.frames_per_block=1", "method.denoising_steps=[1000,750,500,250]"],
    "chunkwise 1-step": ["model.frames_per_block=3", "method.denoising_steps=[1000]"],
    "chunkwise 4-step": ["model.frames_per_block=3", "method.denoising_steps=[1000,750,500,250]"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="toy")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        torch.manual_seed(0)
        CausalWanModel(**WAN_CONFIGS[args.arch]).save_pretrained(checkpoint / "transformer")
        TextEncoder.toy().save_pretrained(checkpoint)
        PatchCodec(4).save_pretrained(checkpoint / "codec")
        base = [f"model.student_arch={args.arch}", "model.num_latent_frames=9", "model.latent_height=8", "model.latent_width=8",
                "method.gradient_num_blocks=1", "method.shift=3.0"]
        generators = {name: ClipGenerator.load(str(checkpoint), load_config(None, base + extra)) for name, extra in VARIANTS.items()}
        params = sum(p.numel() for p in next(iter(generators.values())).student.parameters())
        for gen in generators.values():  # warm-up
            gen.timed("a red square moving left, fast", 0)
        clip_s: dict[str, list[float]] = {name: [] for name in generators}
        first_s: dict[str, list[float]] = {name: [] for name in generators}
        for r in range(args.repeats):
            for name, gen in generators.items():
                _, timing = gen.timed("a red square moving left, fast", r)
                clip_s[name].append(timing.seconds)
                first_s[name].append(timing.first_frame_seconds)
    clip = {k: statistics.median(v) for k, v in clip_s.items()}
    first = {k: statistics.median(v) for k, v in first_s.items()}
    print(f"student {args.arch} ({params / 1e6:.2f}M params), 9 latent frames of 8x8 -> 9 frames of 32x32, patch codec, "
          f"median of {args.repeats}, torch threads 2")
    for name in generators:
        print(f"  {name}: {clip[name] * 1e3:7.1f} ms per clip ({9 / clip[name]:6.1f} frames/s), first frames after {first[name] * 1e3:6.1f} ms")
    for layout, blocks in (("framewise", 9), ("chunkwise", 3)):
        limit = (5 * blocks - 1) / (2 * blocks - 1)
        print(f"{layout}: 4-step / 1-step time per clip {clip[f'{layout} 4-step'] / clip[f'{layout} 1-step']:.2f}x "
              f"(model-call count {limit:.2f}x); first frames {first[f'{layout} 4-step'] / first[f'{layout} 1-step']:.2f}x")
    print(f"first-frame latency chunkwise / framewise (1-step): {first['chunkwise 1-step'] / first['framewise 1-step']:.2f}x; "
          f"time per clip chunkwise / framewise: {clip['chunkwise 1-step'] / clip['framewise 1-step']:.2f}x")


if __name__ == "__main__":
    main()
