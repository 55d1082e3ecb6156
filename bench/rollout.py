"""Rollout speed, as ratios measured in one run (the machine is noisy; absolute times are context only).

(a) one-step vs four-step generation of N blocks. Each step and each cache write is one model call over
    one block, so the ratio cannot beat (2N - 1) / (5N - 1); a measured ratio near that limit means no
    overhead outside the model calls.
(b) 2F frames vs F frames, with the KV cache (close to 2x: each block costs about the same) and with a
    recompute of the whole prefix per block and no cache (grows like F^2).

    python bench/rollout.py                       # the tiny test model
    python bench/rollout.py --arch tiny --frames 12 --size 16 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.flow import x0_from_velocity
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.wan_weights import WAN_CONFIGS
from pipeline.rollout import inference_schedule, rollout, training_steps


def recompute_without_cache(model: CausalWanModel, noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One-step framewise generation without a KV cache: each frame reruns the whole clean prefix."""
    clean: list[torch.Tensor] = []
    for f in range(noise.shape[2]):
        x = torch.cat(clean + [noise[:, :, f : f + 1]], dim=2)
        t = torch.zeros(noise.shape[0], x.shape[2])
        t[:, -1] = 1000.0
        v = model(x, t, text, frames_per_block=1).sample[:, :, -1:]
        clean.append(x0_from_velocity(noise[:, :, f : f + 1], v, 1000.0))
    return torch.cat(clean, dim=2)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, run round-robin so drifts in machine load hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=sorted(WAN_CONFIGS))
    parser.add_argument("--frames", type=int, default=12, help="latent frames F (= blocks, framewise)")
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = CausalWanModel(**WAN_CONFIGS[args.arch]).eval()
    cfg = model.config
    n = args.frames
    noise = torch.randn(1, cfg.in_channels, 2 * n, args.size, args.size)
    text = torch.randn(1, 16, cfg.text_dim)
    four = training_steps([1000, 750, 500, 250], 5.0, warp=True)

    def generate(steps: list[float], frames: int) -> Callable[[], object]:
        schedule = inference_schedule(frames, steps, "uniform")
        return lambda: rollout(model, noise[:, :, :frames], text, schedule, 1)

    with torch.no_grad():
        t = interleaved(
            {
                "one_step": generate([1000.0], n),
                "four_step": generate(four, n),
                "one_step_2F": generate([1000.0], 2 * n),
                "recompute_F": lambda: recompute_without_cache(model, noise[:, :, :n], text),
                "recompute_2F": lambda: recompute_without_cache(model, noise, text),
            },
            args.repeats,
        )
    params = sum(p.numel() for p in model.parameters())
    limit = (2 * n - 1) / (5 * n - 1)
    print(f"model {args.arch} ({params / 1e3:.0f}K params), latent {n}x{args.size}x{args.size}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"(a) one-step {t['one_step'] * 1e3:.1f} ms, four-step {t['four_step'] * 1e3:.1f} ms: "
          f"ratio {t['one_step'] / t['four_step']:.3f} vs call-count limit (2N-1)/(5N-1) = {limit:.3f} "
          f"-> {t['one_step'] / t['four_step'] / limit:.3f}x the limit (target <= 1.10)")
    print(f"(b) 2F/F with KV cache: {t['one_step_2F'] / t['one_step']:.2f}x (target <= 2.2); "
          f"recompute without cache: {t['recompute_2F'] / t['recompute_F']:.2f}x; "
          f"at 2F the cache is {t['recompute_2F'] / t['one_step_2F']:.1f}x faster")


if __name__ == "__main__":
    main()
