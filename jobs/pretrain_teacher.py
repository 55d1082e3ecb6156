"""Train the toy world's bidirectional Wan teacher by flow matching, on clips rendered on the fly.

    python jobs/pretrain_teacher.py --config configs/toy_teacher.yaml [pretrain.steps=...] [--max-minutes 50]

Resumable: rerunning the same command continues from `pretrain.output`/checkpoint.pt (same data order,
optimiser, EMA and RNG). Writes the teacher bundle to `pretrain.output`/teacher, its grade to
eval.json and the loss curve to loss.csv; logs params, metrics and the grade to MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from jobs.cli import run_main
from pipeline.checkpoint import TrainState, atomic_save, replace_directory, save_state_json
from pipeline.config import Config
from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.text import TextEncoder
from pipeline.models.wan_weights import WAN_CONFIGS
from pipeline.storage import load_pickled_tensors
from pipeline.pretrain import (
    SamplerSettings, ToyBundle, ToyClips, ema_update, fit_patch_codec, flow_matching_loss, grade_bundle, new_ema,
)
from pipeline.tracking import open_tracker


def build_optimizer(model: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    pc = cfg.pretrain
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, betas=(0.9, 0.99), weight_decay=pc.weight_decay)

    def warmup_cosine(step: int) -> float:  # linear warm-up, then cosine down to 10% of the peak
        if step < pc.warmup_steps:
            return (step + 1) / pc.warmup_steps
        progress = (step - pc.warmup_steps) / max(1, pc.steps - pc.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)


def main(cfg: Config, args: argparse.Namespace) -> None:
    pc = cfg.pretrain
    if pc.threads:
        torch.set_num_threads(pc.threads)
    out = Path(pc.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(pc.seed)
    text_encoder = TextEncoder.from_pretrained(cfg.model.text_encoder_path) if cfg.model.text_encoder_path else TextEncoder.toy()
    patch = int(cfg.model.codec.removeprefix("patch:")) if cfg.model.codec.startswith("patch:") else 0
    if not patch:
        raise ValueError(f"model.codec={cfg.model.codec!r}: the toy teacher trains on a patch codec ('patch:4')")
    codec = fit_patch_codec(cfg.world, patch, seed=pc.seed)
    model = CausalWanModel(**WAN_CONFIGS[cfg.model.teacher_arch])
    if model.config.in_channels != codec.latent_channels or model.config.text_dim != text_encoder.dim:
        raise ValueError(
            f"model.teacher_arch={cfg.model.teacher_arch} takes {model.config.in_channels} latent channels and "
            f"{model.config.text_dim}-dim text, the codec gives {codec.latent_channels} and the text encoder {text_encoder.dim}"
        )
    ema = new_ema(model)
    opt, schedule = build_optimizer(model, cfg)
    data = ToyClips(cfg.world, codec, text_encoder, pc.seed)
    generator = torch.Generator().manual_seed(pc.seed)

    state = TrainState()
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        saved = load_pickled_tensors(checkpoint, mmap=False)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        state = TrainState(**saved["state"])
        state.restore_rng()
        print(f"resuming {checkpoint} at step {state.step}")

    def bundle(net: CausalWanModel) -> ToyBundle:
        sampler = SamplerSettings(pc.sample_steps, pc.sample_shift, pc.guidance)
        return ToyBundle(net, text_encoder, codec, cfg.world, sampler)

    def save_checkpoint(step: int) -> None:
        train_state = TrainState.capture(step)
        atomic_save({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(), "generator": generator.get_state(),
            "state": train_state.__dict__,
        }, checkpoint)
        save_state_json(train_state, out / "state.json")  # human-readable progress beside the weights

    tracker = open_tracker(cfg.tracking, str(out), cfg.to_dict(), run_name=f"pretrain_teacher:{cfg.name}")
    try:
        started, deadline = time.time(), (time.time() + 60 * args.max_minutes if args.max_minutes else math.inf)
        losses: list[float] = []
        model.train()
        with open(out / "loss.csv", "a") as curve, tqdm(total=pc.steps, initial=state.step, desc="pretrain", unit="step") as bar:
            for step in range(state.step, pc.steps):
                x0, text, _ = data.batch(step, pc.batch_size, pc.cfg_dropout)
                loss = flow_matching_loss(model, x0, text, generator, pc.timestep_shift)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
                opt.step()
                schedule.step()
                ema_update(ema, model, min(pc.ema_decay, (1 + step) / (10 + step)))
                losses.append(loss.item())
                bar.update(1)
                done = step + 1
                if done % pc.log_every == 0:
                    mean = sum(losses) / len(losses)
                    losses.clear()
                    curve.write(f"{done},{mean:.5f},{schedule.get_last_lr()[0]:.3e},{time.time() - started:.0f}\n")
                    curve.flush()
                    bar.set_postfix(loss=f"{mean:.4f}")
                    tracker.log_metrics({"loss": mean, "lr": schedule.get_last_lr()[0]}, step=done)
                if done % pc.eval_every == 0 and done < pc.steps:
                    tracker.log_metrics({f"eval/{k}": v for k, v in grade_bundle(bundle(ema), pc.eval_prompts).items()}, done)
                stop = time.time() > deadline or done == args.stop_at_step
                if done % pc.checkpoint_every == 0 or done == pc.steps or stop:
                    save_checkpoint(done)
                if stop:
                    print(f"stopping at step {done} (--max-minutes / --stop-at-step); rerun to continue")
                    return

        replace_directory(bundle(ema).save, out / "teacher")
        report = grade_bundle(ToyBundle.load(out / "teacher"), pc.eval_prompts)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        tracker.log_metrics({f"eval/{k}": v for k, v in report.items()}, pc.steps)
        tracker.log_artifact(str(out / "eval.json"))
        tracker.log_artifact(str(out / "loss.csv"))
        print(json.dumps(report, indent=1))
    finally:
        tracker.close()  # FAILED or KILLED when an exception or a signal is on its way out


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-minutes", type=float, default=0, help="checkpoint and stop after this long")
    parser.add_argument("--stop-at-step", type=int, default=0, help="checkpoint and stop at this step")


if __name__ == "__main__":
    run_main(main, __doc__, extra_args)
