"""Does a stream follow a prompt switched mid-stream? The toy grader on a trained toy student's streams
(`pipeline/live.py`, which the streaming server runs block by block: its frames are the server's,
tests/test_serve.py): each stream starts on prompt A and switches to prompt B at block `--at`; the
frames before are graded against A, the frames from the switch on against B, and B's own clip from
`generate` (same seed, no switch) against B as the reference.

    python bench/switch.py --checkpoint runs/quickstart/distill/export
    python bench/switch.py --checkpoint EXPORT --pairs 24 --at 4

Pairs are drawn from configs/prompts/toy_world.txt so that A and B differ in colour, shape and
direction alike; seeds 0, 1, ... one per pair.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/switch.py` without an install

from pipeline.config import load_config  # noqa: E402
from pipeline.generation import ClipGenerator  # noqa: E402
from pipeline.live import LiveStream  # noqa: E402
from pipeline.toyworld.grader import grade_clip  # noqa: E402
from pipeline.toyworld.grammar import as_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("colour_ok", "shape_ok", "direction_ok", "adherence")


def different_pairs(prompts: list[str], count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (A, B) pairs of one-object prompts whose object differs in colour, shape and direction."""
    single = [p for p in prompts if len(as_scene(p).objects) == 1]
    rng, pairs = random.Random(seed), []
    while len(pairs) < count:
        a, b = rng.sample(single, 2)
        oa, ob = as_scene(a).objects[0], as_scene(b).objects[0]
        if oa.colour != ob.colour and oa.shape != ob.shape and oa.direction != ob.direction:
            pairs.append((a, b))
    return pairs


def rates(scores: list) -> dict[str, float]:
    return {name: float(np.mean([getattr(s, name) for s in scores])) for name in ATTRIBUTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained toy student's export")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--at", type=int, default=0, help="the block the switch applies to (default: half the clip)")
    args = parser.parse_args()

    gen = ClipGenerator.load(args.checkpoint)
    world = load_config(str(REPO / "configs/toy_teacher.yaml")).world  # the world the quickstart grades in
    blocks = gen.settings.num_blocks
    at = args.at or blocks // 2
    prompts = [line.strip() for line in (REPO / "configs/prompts/toy_world.txt").read_text().splitlines() if line.strip()]
    before, after, reference = [], [], []
    for seed, (a, b) in enumerate(different_pairs(prompts, args.pairs)):
        live, frames = LiveStream(gen, a, seed), []
        for block in range(blocks):
            if block == at:
                live.switch_prompt(b)
            frames.append(live.next_frames())
        cut = sum(len(f) for f in frames[:at])
        clip = np.concatenate(frames)
        before.append(grade_clip(clip[:cut], a, world))
        after.append(grade_clip(clip[cut:], b, world))
        reference.append(grade_clip(gen.generate(b, seed)[cut:], b, world))
    print(f"{args.checkpoint}: {args.pairs} streams of {blocks} blocks, prompt A for blocks 0-{at - 1}, B from block {at}; "
          "A and B differ in colour, shape and direction")
    print("| frames graded | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---|" * len(ATTRIBUTES))
    for label, scores in ((f"before the switch, against A (frames 0-{cut - 1})", before),
                          ("from the switch on, against B", after),
                          ("B's own clip, the same frames (no switch)", reference)):
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in rates(scores).values()) + " |")


if __name__ == "__main__":
    main()
