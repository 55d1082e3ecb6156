"""Generation speed of a toy-sized student on CPU: fused vs unfused cache-writes, one step vs four steps
per block, framewise vs chunkwise; model calls, time per clip and latency to the first frames. Ratios are
measured in one run, interleaved (medians); absolute times are context only.

    python bench/generate.py                 # toy arch (2.4M params), 9 latent frames of 8x8, 7 repeats
    python bench/generate.py --arch toy-debug --repeats 5
    python bench/generate.py --frames 30 --cache-window 6 --sink-frames 3   # a long clip, window with a sink
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

PROMPT = "a red square moving left, fast"
VARIANTS = {
    "framewise 1-step": ["model.frames_per_block=1", "method.denoising_steps=[1000]"],
    "framewise 4-step": ["model.frames_per_block=1", "method.denoising_steps=[1000,750,500,250]"],
    "framewise first4then1": ["model.frames_per_block=1", "method.denoising_steps=[1000,750,500,250]",
                              "method.inference_schedule=first4then1"],
    "chunkwise 1-step": ["model.frames_per_block=3", "method.denoising_steps=[1000]"],
    "chunkwise 4-step": ["model.frames_per_block=3", "method.denoising_steps=[1000,750,500,250]"],
}
MODES = ("unfused", "fused")


def _checkpoint(root: Path, arch: str) -> None:
    torch.manual_seed(0)
    CausalWanModel(**WAN_CONFIGS[arch]).save_pretrained(root / "transformer")
    TextEncoder.toy().save_pretrained(root)
    PatchCodec(4).save_pretrained(root / "codec")


def _count_calls(gen: ClipGenerator, mode: str) -> int:
    """Model calls of one clip, counted by a hook on the student."""
    calls = []
    hook = gen.student.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        gen.settings.fused = mode == "fused"
        gen.generate(PROMPT, 0)
    finally:
        hook.remove()
    return len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="toy")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=9, help="latent frames per clip (a multiple of 3)")
    parser.add_argument("--cache-window", type=int, default=0, help="generate.cache_window (0: all context)")
    parser.add_argument("--sink-frames", type=int, default=0, help="generate.sink_frames (needs --cache-window)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = [f"model.student_arch={args.arch}", f"model.num_latent_frames={args.frames}", "model.latent_height=8",
            "model.latent_width=8", "method.gradient_num_blocks=1", "method.shift=3.0",
            f"generate.cache_window={args.cache_window}", f"generate.sink_frames={args.sink_frames}"]
    with tempfile.TemporaryDirectory() as tmp:
        _checkpoint(Path(tmp), args.arch)
        generators = {name: ClipGenerator.load(tmp, load_config(None, base + extra)) for name, extra in VARIANTS.items()}
    params = sum(p.numel() for p in next(iter(generators.values())).student.parameters())
    runs = [(name, mode) for name in generators for mode in MODES]
    calls = {(name, mode): _count_calls(generators[name], mode) for name, mode in runs}  # also the warm-up
    clip_s: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    first_s: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for r in range(args.repeats):
        for name, mode in runs:
            gen = generators[name]
            gen.settings.fused = mode == "fused"
            _, timing = gen.timed(PROMPT, r)
            clip_s[name, mode].append(timing.seconds)
            first_s[name, mode].append(timing.first_frame_seconds)
    clip = {k: statistics.median(v) for k, v in clip_s.items()}
    first = {k: statistics.median(v) for k, v in first_s.items()}
    window = f", cache window {args.cache_window} with sink {args.sink_frames}" if args.cache_window else ""
    print(f"student {args.arch} ({params / 1e6:.2f}M params), {args.frames} latent frames of 8x8 -> {args.frames} frames of "
          f"32x32{window}, patch codec, median of {args.repeats}, torch threads 2")
    for name, mode in runs:
        print(f"  {name:22s} {mode:7s}: {calls[name, mode]:3d} calls, {clip[name, mode] * 1e3:7.1f} ms per clip "
              f"({args.frames / clip[name, mode]:6.1f} frames/s), first frames after {first[name, mode] * 1e3:6.1f} ms")
    print("fused / unfused:")
    for name in generators:
        u, f = (name, "unfused"), (name, "fused")
        print(f"  {name:22s}: calls {calls[f] / calls[u]:.2f}x, time per clip {clip[f] / clip[u]:.2f}x, "
              f"first frames {first[f] / first[u]:.2f}x")
    for layout in ("framewise", "chunkwise"):
        one, four = (f"{layout} 1-step", "fused"), (f"{layout} 4-step", "fused")
        print(f"{layout} (fused): 4-step / 1-step time per clip {clip[four] / clip[one]:.2f}x "
              f"(model calls {calls[four] / calls[one]:.2f}x); first frames {first[four] / first[one]:.2f}x")


if __name__ == "__main__":
    main()
