"""The true-width tier: the shipped Wan configs themselves, at the real models' widths, in bf16, on the
session's S3 server and Ray cluster.

The overrides shrink only depth, clip, batch and step counts, and move the roles' GPU resources to CPU
shares: the teacher has the 14B's width (5120, 40 heads, ffn 13824) with 1 layer, in its original sharded
release layout; the student and critic have the 1.3B's width (1536, 12 heads, ffn 8960) with 1 layer, in
the Diffusers repository layout, beside a umT5 of Wan's text width (4096) and a Wan VAE of Wan's latent
width (16 channels), both tiny otherwise. The chain is what a user runs: preprocess -> ODE init ->
distillation (teacher and critic on actors) -> generation -> an mp4 that decodes, each stage reading the
last one's output from S3. ODE init takes one step of its regression in this process, with activation
checkpointing as the config has it, on the teacher's trajectories: Ray Train and DeepSpeed at true
width are the distillation's, which starts from the Diffusers release's student (an ODE-init export
handed to a distillation through Ray Train: tests/test_quickstart.py, at toy size); its Train run cost
~45 s here. The chunkwise config then takes one step of the plain loop on the same dataset from the
distillation's export (blocks of 3 latent frames, its GAN tap and R1/R2) and generates a clip with its
settings.

What stays on local disk, and why: the teacher's 1.1 GB of bf16 shards (through the S3 server, once up
and once into the node cache, they were a third of this test's time; the sharded release is read from
S3 at small width in tests/test_official_layouts.py), and the Train runs' directories (DeepSpeed and
critic states, ~2.4 GB per checkpoint; checkpoints on S3 are tested at toy size in
tests/test_critic_actors.py). The exports, which the next stage reads, are on S3."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from pipeline.config import Config, load_config
from pipeline.models.text import build_toy_tokenizer
from pipeline.models.wan_weights import WAN_CONFIGS
from tests.wan_releases import build_diffusers_release, build_sharded_original_dit, tiny_vae

REPO = Path(__file__).resolve().parents[1]
BUCKET = "s3://oneforce-test/true-width"
STUDENT_LAYERS, TEACHER_LAYERS = 1, 1
PROMPTS = "a red square moving left\na blue circle moving up, slow\n"


def seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@pytest.fixture(scope="module")
def releases(s3_server, tmp_path_factory) -> dict[str, str]:
    """The weights at their real widths, written in the releases' layouts and uploaded to S3."""
    local = tmp_path_factory.mktemp("true_width")
    teacher = seeded(0, lambda: WanTransformer3DModel(**{**WAN_CONFIGS["wan2.1-t2v-14b"], "num_layers": TEACHER_LAYERS}))
    build_sharded_original_dit(local / "Wan2.1-T2V-14B", teacher)
    del teacher
    student = seeded(1, lambda: WanTransformer3DModel(**{**WAN_CONFIGS["wan2.1-t2v-1.3b"], "num_layers": STUDENT_LAYERS}))
    tokenizer = build_toy_tokenizer()
    umt5 = seeded(2, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=8, num_heads=4, d_ff=64, num_layers=1, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, relative_attention_max_distance=128)))
    build_diffusers_release(local / "Wan2.1-T2V-1.3B-Diffusers", student, umt5, tokenizer, tiny_vae(3))
    (local / "prompts.txt").write_text(PROMPTS)
    fs = fsspec.filesystem("s3")
    for name in ("Wan2.1-T2V-1.3B-Diffusers", "prompts.txt"):
        fs.put(str(local / name), f"{BUCKET.removeprefix('s3://')}/{name}", recursive=(local / name).is_dir())
    fs.invalidate_cache()
    return {"teacher": str(local / "Wan2.1-T2V-14B"), "repo": f"{BUCKET}/Wan2.1-T2V-1.3B-Diffusers", "prompts": f"{BUCKET}/prompts.txt"}


def shipped(name: str, releases: dict[str, str], ray_address: str, tmp: Path, *extra: str) -> Config:
    """configs/<name>.yaml with the tier's overrides (see the module doc) and `extra`."""
    repo = releases["repo"]
    return load_config(str(REPO / "configs" / f"{name}.yaml"), [
        # where the weights and data are
        f"model.teacher_path={releases['teacher']}", f"model.student_init_path={repo}", f"model.critic_path={repo}",
        f"model.text_encoder_path={repo}", f"model.codec={repo}", f"data.prompts={releases['prompts']}",
        f"data.output={BUCKET}/data", f"train.storage_path={tmp / 'runs'}",
        # depth, clip, batch and steps
        "model.num_latent_frames=6", "model.latent_height=4", "model.latent_width=4", "method.gradient_num_blocks=2",
        "method.discriminator.feature_layers=[0]", "data.teacher_steps=3", "train.steps=1", "train.checkpoint_every=1",
        "train.ema_start_step=0", "data.batch_rows=2", "data.shard_rows=2",
        # CPU shares instead of GPUs, on the session's cluster
        f"ray.address={ray_address}", "ray.use_gpu=false", "ray.num_workers=1", "ray.resources_per_worker={CPU: 0.5}",
        "ray.teacher_actors=1", "ray.teacher_resources={CPU: 0.25}", "ray.critic_actors=1", "ray.critic_resources={CPU: 0.25}",
        "ray.encoder_actors=1", "ray.encoder_resources={CPU: 0.25}", "generate.actors=1", "generate.resources={CPU: 0.5}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.sample_every=1", "tracking.sample_prompts=1",
        *extra,
    ])


def generate(cfg: Config, checkpoint: str, out: str, tmp: Path) -> Path:
    """jobs/generate.py on the export; the first mp4, downloaded."""
    from jobs import generate as job
    from pipeline.planning import read_manifest

    args = argparse.Namespace(checkpoint=checkpoint, prompts=cfg.data.prompts, out=out, config=None, overrides=[
        f"ray.address={cfg.ray.address}", "generate.actors=1", "generate.resources={CPU: 0.5}", "tracking.tracking_uri=none"])
    job.main(cfg, args)
    rows = read_manifest(out)
    assert len(rows) == 2
    local = tmp / Path(rows[0]["path"]).name
    fsspec.filesystem("s3").get(f"{out.removeprefix('s3://')}/{rows[0]['path']}", str(local))
    return local


def test_the_shipped_configs_at_true_width_in_bf16_on_s3(ray_local, ray_cluster, releases, tmp_path):
    from jobs import distill as distill_job
    from jobs import preprocess
    from pipeline import data, distill, trainer
    from pipeline.generation import ClipGenerator
    from pipeline.models.loading import load_student
    from pipeline.video import read_video

    framewise = shipped("wan_1_3b_framewise", releases, ray_cluster[0], tmp_path)
    assert framewise.model.dtype == "bfloat16" and framewise.ray.critic_placement == "actors"
    preprocess.main(framewise, argparse.Namespace())
    info = data.read_info(framewise.data.output)
    assert info.latent.shape == (16, 6, 4, 4) and info.text_embedding.shape[-1] == 4096
    assert len(data.written_ids(framewise.data.output)) == 2

    # ODE init: one step of its regression, in this process, on the 14B teacher's trajectories, the
    # student from the Diffusers release on S3 (see the module doc for why not a Train run).
    checkpointing = framewise.train.gradient_checkpointing
    student = distill.TorchOptimised(load_student(framewise.model, for_ode_init=True, checkpointing=checkpointing), 1e-5, framewise.train)
    before = next(iter(student.params)).detach().clone()
    rows = next(distill.epoch_batches(data.read_dataset(framewise.data.output), 2))
    ode = distill.ode_init_step(student, distill.rows_to_batch(rows, [0, 1]), 0, framewise, list(info.trajectory_timesteps))
    assert ode["ode_skipped"] == 0.0 and math.isfinite(ode["ode_loss"]) and ode["ode_loss"] > 0, ode
    assert not torch.equal(before, next(iter(student.params)))
    del student

    # The distillation on Ray Train: its run's directory on local disk, its export on S3, where
    # generation reads it.
    repo_student = f"{releases['repo']}/transformer"
    dist = shipped("wan_1_3b_framewise", releases, ray_cluster[0], tmp_path, f"model.student_path={repo_student}",
                   f"train.export_path={BUCKET}/distill_export")
    distill_job.main(dist, argparse.Namespace(export=False))
    export = trainer.export_path(dist, "distill")
    assert export.startswith("s3://")
    clip = read_video(str(generate(dist, export, f"{BUCKET}/videos/framewise", tmp_path)))
    assert clip.shape == (21, 32, 32, 3)  # 6 latent frames -> 1 + 5 x 4 frames of 8 x 8 pixels per latent

    # The chunkwise config: blocks of 3 latent frames, its GAN tap and R1/R2, on the same dataset, from
    # the framewise student's export. One step of the plain loop (no Ray, torch AdamW): Ray Train and
    # DeepSpeed at true width were the framewise run's; what this config adds is its step and its generation.
    chunk = shipped("wan_1_3b_chunkwise", releases, ray_cluster[0], tmp_path, f"data.output={framewise.data.output}",
                    f"model.student_path={export}/transformer")
    assert chunk.model.frames_per_block == 3 and chunk.method.r1_weight > 0 and chunk.method.r2_weight > 0
    ctx = distill.plain_context(chunk, data.read_negative_prompt(chunk.data.output))
    before = next(p for p in ctx.student.module.parameters() if p.requires_grad).detach().clone()
    [metrics] = distill.plain_distill(ctx, [data.read_dataset(chunk.data.output)], range(1))
    assert {"dmd", "gan_g", "critic_flow", "gan_d", "r1", "r2"} <= set(metrics), metrics
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["r1"] > 0 and metrics["r2"] > 0, metrics
    assert not torch.equal(before, next(p for p in ctx.student.module.parameters() if p.requires_grad))
    del ctx
    generator = ClipGenerator.load(export, chunk)  # any export, with this config's generation settings
    assert generator.settings.frames_per_block == 3 and generator.generate("a red square", 0).shape == (21, 32, 32, 3)
