"""The weights a user has on disk load by path alone, as every role: Wan2.1's original releases (1.3B
single file, 14B shards with their index, Wan's own umT5 .pth with its tokenizer folder, Wan2.1_VAE.pth),
the Diffusers repositories, and Self-Forcing / One-Forcing training checkpoints (generator_ema, FSDP
wrapper names). Fakes with the releases' file and key names come from tests/wan_releases.py; every
load is compared with a Diffusers-format load of the same weights. A path that is none of these, or
whose shapes disagree, is one line naming the setting, the file and the first mismatching key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.config import load_config
from pipeline.models.codec import WanVAECodec, load_codec
from pipeline.models.loading import (
    check_codec, check_model_paths, check_text_encoder, check_weights, load_critic, load_student, load_teacher,
    load_text_encoder,
)
from pipeline.models.text import TextEncoder, build_toy_tokenizer
from pipeline.models.wan_weights import load_wan, locate_dit
from tests.wan_releases import (
    build_diffusers_release, build_original_dit, build_sharded_original_dit, build_training_checkpoint, build_wan_t5,
    build_wan_vae, tiny_dit, tiny_umt5, tiny_vae,
)

REPO = Path(__file__).resolve().parents[1]
# Two architectures, as the headline pairing has (a wide teacher, a narrow student): "tiny" and a
# wider variant of it that no built-in name describes, so only a config.json can name it.
WIDE = {"num_attention_heads": 4, "ffn_dim": 96}


def outputs(model) -> torch.Tensor:
    config = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 5, config.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text).sample.float()


def wide_dit(seed: int = 1):
    from diffusers import WanTransformer3DModel

    from pipeline.models.wan_weights import WAN_CONFIGS

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_CONFIGS["tiny"], **WIDE}).eval()


def reference(model, tmp: Path, dtype: torch.dtype = torch.float32, stored: torch.dtype = torch.float32):
    """The same weights, as stored in the release (`stored`: the 14B shards hold bf16, the fp32-kept
    modules included), written in the Diffusers layout and loaded from there."""
    state = {k: v.to(stored).float() for k, v in model.state_dict().items()}
    copy = type(model).from_config(model.config)
    copy.load_state_dict(state)
    copy.save_pretrained(tmp / "diffusers-reference")
    return load_wan(str(tmp / "diffusers-reference"), dtype=dtype)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """A 1.3B-style release folder (single file + Wan's T5 and VAE beside it), a 14B-style sharded
    folder, a Diffusers repository and Self-Forcing checkpoints, from known source models."""
    root = tmp_path_factory.mktemp("releases")
    student, teacher = tiny_dit(seed=0), wide_dit(seed=1)
    tokenizer = build_toy_tokenizer()
    small = root / "Wan2.1-T2V-1.3B"
    build_original_dit(small, student)
    t5 = build_wan_t5(small, tiny_umt5(len(tokenizer)), tokenizer)
    vae = build_wan_vae(small, tiny_vae())
    sharded = build_sharded_original_dit(root / "Wan2.1-T2V-14B", teacher)
    diffusers_repo = build_diffusers_release(root / "Wan2.1-T2V-1.3B-Diffusers", student, t5.encoder, tokenizer, vae.vae)
    self_forcing = build_training_checkpoint(root / "self_forcing", student, weights_entry="generator_ema")
    fsdp = build_training_checkpoint(root / "one_forcing", student, weights_entry="generator_ema", fsdp=True, name="fsdp.pt")
    return {"root": root, "student": student, "teacher": teacher, "small": small, "sharded": sharded.folder,
            "index": sharded.index, "diffusers": diffusers_repo, "self_forcing": self_forcing, "fsdp": fsdp,
            "t5": t5, "vae": vae, "tokenizer": tokenizer}


@pytest.mark.parametrize("path", [
    "small",  # the original 1.3B folder: config.json in Wan's format + one safetensors
    "small/diffusion_pytorch_model.safetensors",  # its file alone: the config.json beside it names it
    "diffusers",  # the Diffusers repository root (its sharded transformer/)
    "diffusers/transformer",
])
def test_the_1_3b_layouts_load_by_path_alone(releases, tmp_path, path):
    key, _, rest = path.partition("/")
    where = str(releases[key] / rest) if rest else str(releases[key])
    loaded = load_wan(where)  # no architecture named
    assert torch.equal(outputs(loaded), outputs(reference(releases["student"], tmp_path)))


@pytest.mark.parametrize("path", ["sharded", "index"])
def test_the_14b_sharded_release_loads_from_its_folder_or_its_index(releases, tmp_path, path):
    loaded = load_wan(str(releases[path]), dtype=torch.bfloat16)
    want = reference(releases["teacher"], tmp_path, torch.bfloat16, stored=torch.bfloat16)
    assert loaded.compute_dtype == torch.bfloat16 and torch.equal(outputs(loaded), outputs(want))


@pytest.mark.parametrize("checkpoint", ["self_forcing", "fsdp"])
def test_self_forcing_and_fsdp_checkpoints_load_their_ema(releases, tmp_path, checkpoint):
    loaded = load_wan(str(releases[checkpoint]), config="tiny")  # a training checkpoint names no architecture
    assert torch.equal(outputs(loaded), outputs(reference(releases["student"], tmp_path)))
    check_weights(load_config(None, [f"model.student_path={releases[checkpoint]}", "model.student_arch=tiny"]).model,
                  "student_path")


def test_the_headline_pairing_loads_as_every_role_by_path(releases, tmp_path):
    """A wide teacher from its sharded release and a narrow student and critic from the 1.3B release,
    with the text encoder and codec of that release: *_arch left at the Wan defaults (the config.json
    beside the weights decides), checked on headers first, then loaded."""
    small = str(releases["small"])
    cfg = load_config(None, [
        f"model.teacher_path={releases['sharded']}", f"model.student_init_path={small}", f"model.student_path={small}",
        f"model.critic_path={small}", f"model.text_encoder_path={small}", f"model.codec={small}",
        "method.discriminator.feature_layers=[0, 1]", "method.discriminator.num_heads=2", "method.discriminator.ffn_dim=32",
    ])
    check_model_paths(cfg.model, ["teacher_path", "student_init_path", "student_path", "critic_path", "text_encoder_path", "codec"])
    teacher, student = load_teacher(cfg.model), load_student(cfg.model, for_ode_init=True)
    assert torch.equal(outputs(teacher), outputs(reference(releases["teacher"], tmp_path / "t", stored=torch.bfloat16)))
    assert torch.equal(outputs(student), outputs(reference(releases["student"], tmp_path / "s")))
    assert torch.equal(outputs(load_critic(cfg).trunk), outputs(student))
    prompts = ["a red square moving left", "a blue circle"]
    encoder = load_text_encoder(cfg.model)
    want = TextEncoder(releases["tokenizer"], releases["t5"].encoder, encoder.max_length).encode(prompts)
    assert torch.allclose(encoder.encode(prompts), want, atol=5e-2)  # the .pth holds bf16 weights
    codec = load_codec(small)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(codec.decode(latents), WanVAECodec(releases["vae"].vae).decode(latents))


def test_the_diffusers_repository_gives_the_text_encoder_and_vae(releases):
    repo = str(releases["diffusers"])
    encoder = TextEncoder.from_pretrained(repo)
    prompts = ["a green triangle moving down"]
    assert torch.equal(encoder.encode(prompts), TextEncoder(releases["tokenizer"], releases["t5"].encoder, encoder.max_length).encode(prompts))
    assert isinstance(load_codec(repo), WanVAECodec)


def test_wan_t5_pth_alone_finds_its_tokenizer(releases):
    encoder = TextEncoder.from_pretrained(str(releases["t5"].pth), dtype=torch.bfloat16)
    assert encoder.encoder.dtype == torch.bfloat16 and encoder.encode(["a red square"]).shape[-1] == 32


def test_the_sharded_release_on_s3_is_checked_on_headers_and_loads(releases, s3_server, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.put(str(releases["sharded"]), "oneforce-test/releases/Wan2.1-T2V-14B", recursive=True)
    fs.put(str(releases["small"]), "oneforce-test/releases/Wan2.1-T2V-1.3B", recursive=True)
    fs.invalidate_cache()
    url, small = "s3://oneforce-test/releases/Wan2.1-T2V-14B", "s3://oneforce-test/releases/Wan2.1-T2V-1.3B"
    assert len(locate_dit(url).files) == 6
    check_weights(load_config(None, [f"model.teacher_path={url}"]).model, "teacher_path")
    check_text_encoder(small)
    check_codec(small)
    assert torch.equal(outputs(load_wan(url)), outputs(reference(releases["teacher"], tmp_path, stored=torch.bfloat16)))


def test_layouts_that_are_not_weights_are_one_line_naming_the_setting(releases, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_config(None, [f"model.teacher_path={tmp_path / 'empty'}"]).model
    with pytest.raises(ValueError, match=rf"^model.teacher_path={tmp_path / 'empty'}: not a Wan DiT folder"):
        check_weights(cfg, "teacher_path")
    # A DiT release without Wan2.1_VAE.pth as model.codec: refused (it used to build a random VAE).
    (tmp_path / "dit_only").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / "dit_only" / name).write_bytes((releases["small"] / name).read_bytes())
    with pytest.raises(ValueError, match=r"^model.codec=.*dit_only: not a Wan VAE"):
        check_codec(str(tmp_path / "dit_only"))
    with pytest.raises(ValueError, match="not a Wan VAE"):
        load_codec(str(tmp_path / "dit_only"))
    with pytest.raises(ValueError, match=r"^model.text_encoder_path=.*dit_only: not a text encoder"):
        check_text_encoder(str(tmp_path / "dit_only"))


def test_shapes_that_disagree_with_the_config_beside_them_name_the_first_key(releases, tmp_path):
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    config = json.loads((releases["small"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ffn_dim": config["ffn_dim"] * 2}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes((releases["small"] / "diffusion_pytorch_model.safetensors").read_bytes())
    cfg = load_config(None, [f"model.critic_path={folder}"]).model
    with pytest.raises(ValueError, match=(
        rf"^model.critic_path={folder}: the weights do not match the config.json beside them: \d+ tensors of another "
        r"shape \(e.g. blocks.0.ffn.net.0.proj.bias: \[64\] in the weights, \[128\] expected\)$"
    )):
        check_weights(cfg, "critic_path")


def test_dry_run_of_the_shipped_config_checks_every_weight_path(releases):
    """The shipped Wan config pointed at the releases: --dry-run checks them (headers only) and says so;
    a wrong one is the job's one line, exit 2."""
    small = str(releases["small"])
    paths = [f"model.teacher_path={releases['sharded']}", f"model.text_encoder_path={small}", f"model.codec={small}"]
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "jobs/preprocess.py", "--config", "configs/wan_1_3b_framewise.yaml", "--dry-run", *paths, *extra],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    good = run()
    assert good.returncode == 0 and "weights: every path's layout and shapes check out" in good.stdout, good.stderr[-2000:]
    bad = run(f"model.codec={releases['sharded']}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"error: model.codec={releases['sharded']}: not a Wan VAE")
