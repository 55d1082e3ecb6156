"""jobs/preprocess.py on a real local Ray instance: every prompt-file format through the text-encoder
and teacher-sampler actor pools into Parquet, checked against an in-process recompute; resume after an
interrupted run; byte-identical reruns; s3:// in and out on the local S3 server."""

import shutil

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from jobs import preprocess
from pipeline import data
from pipeline.config import load_config
from pipeline.flow import euler_sample, guided_velocity
from pipeline.models.loading import load_teacher, load_text_encoder


def _config(prompts, output, **extra):
    overrides = {
        "model.teacher_arch": "tiny", "model.num_latent_frames": 3, "model.latent_height": 4, "model.latent_width": 4,
        "method.shift": 3.0, "method.gradient_num_blocks": 3, "method.negative_prompt": "blurry", "data.teacher_steps": 3, "data.teacher_guidance": 3.0,
        "data.trajectory_steps": "[1000, 500]", "data.shard_rows": 4, "data.batch_rows": 2, "data.max_prompt_chars": 60,
        "ray.encoder_resources": "{CPU: 0.5}", "ray.teacher_resources": "{CPU: 0.5}", "tracking.tracking_uri": "none",
        "data.prompts": prompts, "data.output": output, **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _prompt_dir(root):
    root.mkdir()
    (root / "a.txt").write_text("a red square moving left, fast\n\na blue circle moving up, slow\n" + "x" * 61 + "\n")
    (root / "b.jsonl").write_text('{"prompt": "a green triangle moving down, fast", "seed": 5}\n{"prompt": 3}\n')
    (root / "c.csv").write_text("prompt,samples\n\"a red  square moving left, fast\",2\n")  # duplicate of a.txt:1 + seed 1
    pq.write_table(__import__("pyarrow").table({"prompt": ["a yellow square moving right, slow"]}), root / "d.parquet")
    return root


def _recompute(cfg, prompt, seed):
    """The same row computed in this process, without Ray, Parquet or batching."""
    encoder, teacher = load_text_encoder(cfg.model), load_teacher(cfg.model)
    cond, uncond = encoder.encode([prompt]), encoder.encode([cfg.method.negative_prompt])
    timesteps, keep = preprocess.teacher_schedule(cfg)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(data.noise_seed(data.prompt_id(prompt, seed))))
    velocity = guided_velocity(lambda x, t, c: teacher(x, t, c).sample, cond, uncond, cfg.data.teacher_guidance)
    latent, kept = euler_sample(velocity, noise[None], timesteps, keep)
    return cond[0], latent[0], torch.stack([kept[t][0] for t in keep]), noise


def test_all_formats_bad_lines_dedupe_and_round_trip(ray_local, tmp_path):
    cfg = _config(str(_prompt_dir(tmp_path / "prompts")), str(tmp_path / "out"))
    plan, written = preprocess.run(cfg)
    reasons = {(b.source.rsplit("/", 1)[-1], b.line): b.reason for b in plan.bad}
    assert reasons == {("a.txt", 2): "empty prompt", ("a.txt", 4): "prompt has 61 characters, more than data.max_prompt_chars=60",
                       ("b.jsonl", 2): "'prompt' is int"}
    assert plan.duplicates == 1 and written == 5 and plan.already_written == 0
    ds = data.read_dataset(cfg.data.output)
    assert sorted(zip(ds["prompt"], ds["seed"])) == sorted([
        ("a red square moving left, fast", 0), ("a red  square moving left, fast", 1), ("a blue circle moving up, slow", 0),
        ("a green triangle moving down, fast", 5), ("a yellow square moving right, slow", 0),
    ])
    info = data.read_info(cfg.data.output)
    assert info.trajectory_timesteps == tuple(preprocess.teacher_schedule(cfg)[1]) and info.teacher_id == "random:tiny:0"
    row = ds["prompt"].index("a green triangle moving down, fast")
    text, latent, trajectory, noise = _recompute(cfg, "a green triangle moving down, fast", 5)
    assert torch.equal(ds["text_embedding"][row], text)
    assert torch.allclose(ds["latent"][row], latent, atol=1e-6) and torch.allclose(ds["trajectory"][row], trajectory, atol=1e-6)
    assert torch.equal(ds["trajectory"][row, 0], noise)  # the state at t = 1000 is the seeded noise itself
    negative = data.read_negative_prompt(cfg.data.output)
    assert torch.equal(negative, load_text_encoder(cfg.model).encode(["blurry"])[0])

    # The loader training uses: Ray Data over the shards, decoded batch by batch.
    seen = {}
    for batch in ray_local.data.read_parquet(cfg.data.output).iter_batches(batch_size=2, batch_format="pyarrow"):
        decoded = data.decode_batch(batch, info)
        seen.update({i: (e, l) for i, e, l in zip(decoded["id"], decoded["text_embedding"], decoded["latent"])})
    assert sorted(seen) == ds["id"]
    for i, row_id in enumerate(ds["id"]):
        assert torch.equal(seen[row_id][0], ds["text_embedding"][i]) and torch.equal(seen[row_id][1], ds["latent"][i])


def test_resume_after_an_interrupted_run_writes_no_duplicates_and_same_bytes(ray_local, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a red square moving left, fast {i}\n" for i in range(10)))
    first = _config(str(prompts), str(tmp_path / "first"))
    preprocess.run(first)
    # Interrupt a second run's output: keep one whole shard, leave a half-written temporary.
    second = _config(str(prompts), str(tmp_path / "second"))
    shards = data.shard_paths(first.data.output)
    assert len(shards) == 3  # 10 rows in shards of at most 4
    (tmp_path / "second").mkdir()
    shutil.copy(tmp_path / "first" / "_dataset.json", tmp_path / "second")
    shutil.copy(shards[0], tmp_path / "second")
    (tmp_path / "second" / ".tmp-part-0000.parquet").write_bytes(b"killed mid-write")
    kept = data.written_ids(second.data.output)
    plan, written = preprocess.run(second)
    assert plan.already_written == len(kept) and written == 10 - len(kept)
    a, b = data.read_dataset(first.data.output), data.read_dataset(second.data.output)
    assert a["id"] == b["id"] and len(set(b["id"])) == 10
    for column in ("text_embedding", "latent", "trajectory"):  # two runs, same config: identical bytes
        assert a[column].numpy().tobytes() == b[column].numpy().tobytes(), column
    again, nothing = preprocess.run(second)
    assert nothing == 0 and again.already_written == 10


def test_s3_in_and_out(ray_local, s3_server, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.pipe("oneforce-test/prompts/p.jsonl", b'{"prompt": "a blue square moving right, fast"}\n{"prompt": ""}\n')
    cfg = _config("s3://oneforce-test/prompts/", "s3://oneforce-test/pre")
    plan, written = preprocess.run(cfg)
    assert written == 1 and [str(b) for b in plan.bad] == ["s3://oneforce-test/prompts/p.jsonl:2: empty prompt"]
    ds = data.read_dataset("s3://oneforce-test/pre")
    assert ds["prompt"] == ["a blue square moving right, fast"] and ds["latent"].shape == (1, 4, 3, 4, 4)
    assert not [p for p in fs.ls("oneforce-test/pre") if ".tmp-" in p]


def test_the_job_refuses_a_missing_prompt_file(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        preprocess.run(_config(str(tmp_path / "nope.txt"), str(tmp_path / "out")))


def test_captioned_videos_become_real_rows_beside_teacher_rows(ray_local, tmp_path):
    from pipeline import toyworld
    from pipeline.models.codec import PatchCodec, clips_to_video
    from pipeline.video import write_mp4

    world = toyworld.WorldConfig(object_size=8)
    videos = tmp_path / "videos"
    videos.mkdir()
    captions = ["a red square moving left, fast", "a blue circle moving up, slow"]
    clips = [toyworld.render(c, i, world) for i, c in enumerate(captions)]
    for i, clip in enumerate(clips):
        write_mp4(clip, videos / f"clip{i}.mp4")
    write_mp4(clips[0][:5], videos / "short.mp4")
    (videos / "broken.mp4").write_bytes(b"not a video")
    (videos / "captions.jsonl").write_text(
        "".join(f'{{"video": "clip{i}.mp4", "prompt": "{c}"}}\n' for i, c in enumerate(captions))
        + '{"video": "short.mp4", "prompt": "short"}\n{"video": "broken.mp4", "prompt": "broken"}\n{"prompt": "no video"}\n'
    )
    (tmp_path / "p.txt").write_text("a green triangle moving down, fast\n")
    cfg = _config(str(tmp_path / "p.txt"), str(tmp_path / "out"), **{
        "model.teacher_arch": "toy-debug", "model.codec": "patch:4", "model.num_latent_frames": 9,
        "model.latent_height": 8, "model.latent_width": 8, "method.gradient_num_blocks": 9, "data.videos": str(videos),
    })
    plan, written = preprocess.run(cfg)
    assert written == 3
    reasons = {(b.source.rsplit("/", 1)[-1], b.line): b.reason for b in plan.bad}
    assert sorted(reasons) == [("captions.jsonl", 3), ("captions.jsonl", 4), ("captions.jsonl", 5)]
    assert reasons[("captions.jsonl", 3)] == f"video {videos}/short.mp4: 5 frames of 32x32, the latents need 9 of 32x32"
    assert reasons[("captions.jsonl", 4)].startswith(f"video {videos}/broken.mp4: cannot decode video")
    assert reasons[("captions.jsonl", 5)] == "no 'video' field"
    ds = data.read_dataset(cfg.data.output)
    kinds = dict(zip(ds["prompt"], ds["kind"]))
    assert kinds == {**{c: "real" for c in captions}, "a green triangle moving down, fast": "teacher"}
    row = ds["prompt"].index(captions[1])
    truth = PatchCodec(4).encode(clips_to_video(clips[1][None]))[0]
    error = (ds["latent"][row] - truth).abs()  # H.264 4:4:4 at crf 12 is near-lossless: a few levels at edges
    assert error.mean() < 0.01 and error.max() < 0.1
    assert not ds["trajectory"][row].any()  # real rows carry no ODE trajectory
