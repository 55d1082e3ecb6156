"""Loading the DiT: original keys through diffusers' converter, Self-Forcing-style checkpoints, prefixes,
s3, and the precision every layout loads to. (The official releases' layouts: tests/test_official_layouts.py.)"""

import logging

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.wan_weights import load_wan, to_diffusers_keys
from tests.conftest import tiny_wan
from tests.wan_releases import diffusers_dit_to_original


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, t, text).sample


def test_original_keys_go_through_diffusers_converter_and_unknown_ones_are_named(tmp_path):
    """Original-layout files are converted by diffusers' own converter; a key it does not know stays
    as it is, and the strict load names it."""
    state = tiny_wan().state_dict()
    original = diffusers_dit_to_original(state)
    assert "blocks.0.self_attn.q.weight" in original and "blocks.0.norm3.weight" in original
    ours = to_diffusers_keys(original)
    assert set(ours) == set(state) and all(torch.equal(ours[k], state[k]) for k in state)
    save_file({**{k: v.contiguous() for k, v in original.items()}, "blocks.0.mystery.weight": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"w.safetensors: weights do not match the model: unexpected blocks.0.mystery.weight"):
        load_wan(str(tmp_path / "w.safetensors"), config="tiny")


def test_loads_diffusers_directory(tmp_path):
    model = tiny_wan(seed=3)
    model.save_pretrained(tmp_path / "transformer")
    loaded = load_wan(str(tmp_path / "transformer"))
    assert torch.equal(_outputs(loaded), _outputs(model))


@pytest.mark.parametrize("wrapper", ["generator", "generator_ema"])
def test_loads_self_forcing_style_pt_in_original_layout(tmp_path, wrapper):
    model = tiny_wan(seed=4)
    original = {f"model.{k}": v for k, v in diffusers_dit_to_original(model.state_dict()).items()}
    other = {f"model.{k}": torch.zeros_like(v) for k, v in diffusers_dit_to_original(model.state_dict()).items()}
    payload = {wrapper: original, "critic": other}
    torch.save(payload, tmp_path / "ckpt.pt")
    loaded = load_wan(str(tmp_path / "ckpt.pt"), config="tiny", entry=wrapper)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_loads_prefixed_safetensors_and_names_mismatches(tmp_path):
    model = tiny_wan(seed=5)
    save_file({f"generator.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    assert torch.equal(_outputs(load_wan(str(tmp_path / "w.safetensors"), config="tiny")), _outputs(model))
    broken = {k: v for k, v in model.state_dict().items() if k != "proj_out.bias"}
    save_file({k: v.contiguous() for k, v in broken.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken.safetensors.*missing proj_out.bias"):
        load_wan(str(tmp_path / "broken.safetensors"), config="tiny")
    with pytest.raises(ValueError, match="needs a model config"):
        load_wan(str(tmp_path / "w.safetensors"))


def test_loads_diffusers_directory_from_s3(tmp_path, s3_server):
    model = tiny_wan(seed=6)
    model.save_pretrained(tmp_path / "transformer")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "transformer"), "oneforce-test/models/transformer", recursive=True)
    loaded = load_wan("s3://oneforce-test/models/transformer")
    assert torch.equal(_outputs(loaded), _outputs(model))


def _dtypes(model):
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


def test_single_file_and_directory_keep_the_same_modules_in_float32(tmp_path):
    """diffusers' from_pretrained keeps `_keep_in_fp32_modules` (RoPE, time embedder, norms, modulation)
    in fp32 under a bf16 torch_dtype; a single weights file must load to the same mixed precision."""
    model = tiny_wan(seed=7)
    model.save_pretrained(tmp_path / "transformer")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    from_dir = load_wan(str(tmp_path / "transformer"), dtype=torch.bfloat16)
    from_file = load_wan(str(tmp_path / "w.safetensors"), config="tiny", dtype=torch.bfloat16)
    dtypes = _dtypes(from_dir)
    assert dtypes == _dtypes(from_file)
    assert dtypes["rope.freqs_cos"] == dtypes["scale_shift_table"] == dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 2, 8, 8, generator=g).bfloat16(), torch.randn(1, 5, 32, generator=g).bfloat16()
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(from_dir(x, t, text).sample, from_file(x, t, text).sample)


def test_float32_load_does_not_warn_about_float32_modules(tmp_path, caplog):
    # diffusers' loggers do not propagate to the root logger: listen on its library logger directly.
    model = tiny_wan(seed=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    model.save_pretrained(tmp_path / "transformer")
    library_logger = logging.getLogger("diffusers")
    library_logger.addHandler(caplog.handler)
    try:
        load_wan(str(tmp_path / "w.safetensors"), config="tiny")
        load_wan(str(tmp_path / "transformer"))
    finally:
        library_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_init_teacher_casts_like_a_loaded_one_without_warning(dtype, tmp_path, caplog):
    """The random-init teacher (no teacher_path) gets the mixed precision of a bf16 load (fp32-kept
    modules stay fp32) and no float32-modules warning, as `load_wan` does."""
    from pipeline.config import ModelConfig
    from pipeline.models.loading import load_teacher

    library_logger = logging.getLogger("diffusers")
    library_logger.addHandler(caplog.handler)
    try:
        teacher = load_teacher(ModelConfig(teacher_arch="tiny", dtype=dtype))
    finally:
        library_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "float32" in r.getMessage()]
    torch_dtype = getattr(torch, dtype)
    teacher.save_pretrained(tmp_path / "transformer")  # what from_pretrained makes of the same weights
    assert _dtypes(teacher) == _dtypes(load_wan(str(tmp_path / "transformer"), dtype=torch_dtype))
    assert _dtypes(teacher)["scale_shift_table"] == torch.float32
    assert _dtypes(teacher)["blocks.0.attn1.to_q.weight"] == torch_dtype
