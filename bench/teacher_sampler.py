"""Grade a toy teacher bundle under several sampler settings (Euler steps, shift, CFG scale).

    python bench/teacher_sampler.py --bundle runs/toy_teacher/teacher --prompts 48 --seed 1234 \
        --grid 25:3:4 50:3:2

Every setting samples the same prompts from the same noise, so the rows differ only by the sampler.
Choose on one seed, then report the chosen setting on all prompts with a fresh seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from pipeline.pretrain import SamplerSettings, ToyBundle, grade_bundle

COLUMNS = ("adherence", "colour_ok", "shape_ok", "direction_ok", "speed_ok", "sharpness", "temporal", "frechet")


def parse_setting(text: str) -> SamplerSettings:
    steps, shift, guidance = text.split(":")
    return SamplerSettings(int(steps), float(shift), float(guidance))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a toy teacher bundle directory")
    parser.add_argument("--prompts", type=int, default=48, help="distinct prompts (all: 96 single-object ones)")
    parser.add_argument("--seed", type=int, default=1234, help="picks the prompts and the noise")
    parser.add_argument("--grid", nargs="+", type=parse_setting, default=None,
                        help="settings as steps:shift:cfg (default: the bundle's own)")
    args = parser.parse_args()

    bundle = ToyBundle.load(args.bundle)
    print(f"{args.bundle}: {args.prompts} prompts, seed {args.seed}")
    print("| steps | shift | CFG | " + " | ".join(c.removesuffix("_ok") for c in COLUMNS) + " | seconds |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for setting in args.grid or [bundle.sampler]:
        started = time.perf_counter()
        report = grade_bundle(dataclasses.replace(bundle, sampler=setting), args.prompts, args.seed)
        cells = " | ".join(f"{report[c]:.3f}" for c in COLUMNS)
        print(f"| {setting.steps} | {setting.shift:g} | {setting.guidance:g} | {cells} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
