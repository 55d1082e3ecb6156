"""Weights on s3:// for every role: the DiT, the text encoder and tokenizer, the VAE and exports are read
through one node-local cache, downloaded once per content and shared by the processes of a node."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import AutoencoderKLWan

from pipeline.config import load_config
from pipeline.models.codec import WanVAECodec, load_codec
from pipeline.models.text import TextEncoder
from pipeline.storage import cache_root, node_cache

BUCKET = "oneforce-test"


def upload(local: Path, key: str) -> str:
    fs = fsspec.filesystem("s3")
    fs.put(str(local), f"{BUCKET}/{key}", recursive=local.is_dir())
    fs.invalidate_cache()
    return f"s3://{BUCKET}/{key}"


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.1] * 4, latents_std=[1.5] * 4).eval()


def test_a_remote_folder_is_downloaded_once_per_content(s3_server, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"one")
    url = upload(folder, "cache/weights")
    first = node_cache(url)
    assert Path(first).name == "weights" and (Path(first) / "a.bin").read_bytes() == b"one"
    assert Path(first).is_relative_to(cache_root())
    stamp = (Path(first) / "a.bin").stat().st_mtime_ns
    assert node_cache(url) == first and (Path(first) / "a.bin").stat().st_mtime_ns == stamp  # reused, not fetched
    (folder / "a.bin").write_bytes(b"two!")  # a new upload under the same URL is a new entry
    upload(folder / "a.bin", "cache/weights/a.bin")
    second = node_cache(url)
    assert second != first and (Path(second) / "a.bin").read_bytes() == b"two!"
    assert node_cache(str(folder)) == str(folder)  # local paths are used where they are


def test_concurrent_callers_share_one_download(s3_server, tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 100_000)
    url = upload(tmp_path / "big.bin", "cache/big.bin")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(node_cache(url))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and Path(results[0]).read_bytes() == b"x" * 100_000
    key = Path(results[0]).parent.name
    assert [p.name for p in cache_root().iterdir() if p.name.startswith(f".{key}-")] == []  # no half downloads left


def test_a_missing_remote_path_names_the_setting(s3_server):
    with pytest.raises(FileNotFoundError, match=r"model.codec=s3://oneforce-test/nothing: no such file"):
        node_cache(f"s3://{BUCKET}/nothing", "model.codec")


def test_text_encoder_and_vae_load_from_s3_as_from_disk(s3_server, tmp_path):
    encoder = TextEncoder.toy()
    encoder.save_pretrained(tmp_path / "checkout")
    codec = WanVAECodec(tiny_vae())
    codec.save_pretrained(tmp_path / "checkout" / "vae")
    root = upload(tmp_path / "checkout", "cache/checkout")
    prompts = ["a red square moving left", "a blue circle moving up"]
    assert torch.equal(TextEncoder.from_pretrained(root).encode(prompts), encoder.encode(prompts))
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for spec in (root, f"{root}/vae"):  # a Diffusers checkout or its vae/ folder
        with torch.no_grad():
            assert torch.equal(load_codec(spec).decode(latents), codec.decode(latents))


def test_an_export_takes_its_text_encoder_and_vae_from_s3(s3_server, tmp_path):
    """export_student with both on s3 and the export itself on s3 (it used to copytree the URL)."""
    from safetensors.torch import save_file

    from pipeline.checkpoint import export_student
    from pipeline.generation import ClipGenerator
    from pipeline.models.causal_wan import CausalWanModel
    from pipeline.models.wan_weights import WAN_CONFIGS

    TextEncoder.toy().save_pretrained(tmp_path / "text")
    WanVAECodec(tiny_vae(1)).save_pretrained(tmp_path / "vae")
    text, vae = upload(tmp_path / "text", "export/text"), upload(tmp_path / "vae", "export/vae")
    architecture = dict(WAN_CONFIGS["tiny"])
    student = CausalWanModel(**architecture)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, tmp_path / "weights.safetensors")
    cfg = load_config(None, ["model.student_arch=tiny", f"model.text_encoder_path={text}", f"model.codec={vae}",
                             "model.num_latent_frames=2", "model.latent_height=4", "model.latent_width=4",
                             "method.gradient_num_blocks=1"])
    out = f"s3://{BUCKET}/export/student"
    export_student(str(tmp_path / "weights.safetensors"), architecture, cfg, out)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert {Path(p).name for p in fs.ls(out)} >= {"transformer", "tokenizer", "text_encoder", "vae", "oneforce.json"}
    generator = ClipGenerator.load(out)
    assert isinstance(generator.codec, WanVAECodec) and generator.generate("a red square", 0).shape == (5, 32, 32, 3)
