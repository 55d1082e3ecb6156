"""What a Wan block keeps for backward, measured at the 1.3B's true width on CPU, and the planner's
predictions checked against measured rollouts and critic updates.

    python bench/activations.py --measure   # writes pipeline/assets/activation_bytes.json (~2 min)
    python bench/activations.py --check     # planner vs measured, student rollout and critic update

`--measure`: a Wan block at width 1536 (12 heads, ffn 8960), bf16 and fp32, with and without activation
checkpointing. Memory is malloc's count of bytes in use (`pipeline.distributed.heap_bytes`): what a
forward with grad holds when it returns, until its backward frees it. Per layer it is `a * video tokens
+ b * text tokens` (the cross-attention keeps the text's keys and values): from models of 1 and 2
layers (the difference is one layer) at two video lengths and two text lengths. The GAN tap's own
retention likewise, per token of the feature map it reads.

`--check`: the planner (`pipeline.capacity`) predicts what a true-width, 2-layer, small-grid student
rollout (framewise, grad on the last blocks) and a critic update (flow, discriminator, R1 and R2
forwards) keep for backward; each is measured and the ratio printed. Target: within 20%.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.capacity import ACTIVATION_FILE, MEASURED_ARCH, ActivationBytes, held_for_backward  # noqa: E402
from pipeline.capacity import measurement_model as wan  # noqa: E402
from pipeline.models.discriminator import build_gan_heads  # noqa: E402
from pipeline.models.wan_weights import cast_like_from_pretrained  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GRID = 16  # latent 16 x 16 -> 64 tokens per frame
VIDEO_FRAMES, TEXT_TOKENS = (4, 8), (32, 96)


def block_bytes(dtype: torch.dtype, checkpointing: bool) -> dict[str, float]:
    """Per layer: bytes per video token and per text token, from the 2-layer minus 1-layer difference."""
    models = {layers: wan(layers, dtype, checkpointing) for layers in (1, 2)}
    g = torch.Generator().manual_seed(0)

    def held(frames: int, text_tokens: int) -> dict:
        x = torch.randn(1, 16, frames, GRID, GRID, generator=g).to(dtype)
        text = torch.randn(1, text_tokens, 4096, generator=g).to(dtype)
        t = torch.tensor([500.0])
        forwards = {n: (lambda m=m: m(x, t, text).sample) for n, m in models.items()}
        forwards["trunk"] = lambda: models[1](x, t, text, feature_layers=(0,)).features[0]  # no head: a critic's logits
        result = {}
        for _ in range(2):  # the second round counts: lazily built tables and allocator pools settled
            result = {name: held_for_backward(forward) for name, forward in forwards.items()}
        return result

    tokens_per_frame = (GRID // 2) ** 2
    (f1, f2), (l1, l2) = VIDEO_FRAMES, TEXT_TOKENS
    base, more_video, more_text = held(f1, l1), held(f2, l1), held(f1, l2)
    layer = {key: h[2] - h[1] for key, h in (("base", base), ("video", more_video), ("text", more_text))}
    video = (layer["video"] - layer["base"]) / ((f2 - f1) * tokens_per_frame)
    text = (layer["text"] - layer["base"]) / (l2 - l1)
    # Outside the layers (a 1-layer model less its layer): the text embedder's per text token, the rest
    # (patch and time embeddings, the head) per video token.
    outside_text = ((more_text[1] - layer["text"]) - (base[1] - layer["base"])) / (l2 - l1)
    outside = (base[1] - layer["base"] - outside_text * l1) / (f1 * tokens_per_frame)
    head = (base[1] - base["trunk"]) / (f1 * tokens_per_frame)
    return {"per_video_token": round(video, 1), "per_text_token": round(max(text, 0.0), 1),
            "outside_per_video_token": round(max(outside, 0.0), 1), "outside_per_text_token": round(max(outside_text, 0.0), 1),
            "head_per_video_token": round(max(head, 0.0), 1)}


def tap_bytes(dtype: torch.dtype, checkpointing: bool) -> float:
    """Bytes per token of the feature map a GAN tap holds for backward (beyond the map itself)."""
    trunk = wan(1, dtype, False)
    heads = build_gan_heads(trunk, [0], num_registers=1, num_heads=12, ffn_dim=2048).to(dtype)
    if checkpointing:
        heads.enable_gradient_checkpointing()
    heads.train()
    g = torch.Generator().manual_seed(1)
    held = []
    for tokens in (512, 1024, 512, 1024):
        features = torch.randn(1, tokens, 1536, generator=g).to(dtype).requires_grad_(True)
        held.append(held_for_backward(lambda f=features: heads([f])))
    return round((held[3] - held[2]) / 512, 1)


def measure(out: Path) -> None:
    result: dict = {
        "command": "python bench/activations.py --measure",
        "measured": datetime.date.today().isoformat(),
        "architecture": MEASURED_ARCH,
        "grid": f"latent {GRID}x{GRID}, video frames {list(VIDEO_FRAMES)}, text tokens {list(TEXT_TOKENS)}",
        "bytes": {},
    }
    for name, dtype in DTYPES.items():
        result["bytes"][name] = {
            "block": {mode: block_bytes(dtype, mode == "checkpointed") for mode in ("unchecked", "checkpointed")},
            "gan_tap": {mode: tap_bytes(dtype, mode == "checkpointed") for mode in ("unchecked", "checkpointed")},
        }
        print(name, json.dumps(result["bytes"][name]))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def check() -> None:
    from pipeline.capacity import critic_update_bytes, kv_cache_bytes, rollout_bytes
    from pipeline.distill import CriticBatch, critic_losses
    from pipeline.config import load_config
    from pipeline.models.discriminator import Critic
    from pipeline.rollout import inference_schedule, rollout

    table = ActivationBytes.load()
    frames, grad_blocks, text_tokens = 8, 6, 64
    rows = []
    for name, dtype in DTYPES.items():
        for checkpointing in (False, True):
            model = wan(2, dtype, checkpointing)
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(1, 16, frames, GRID, GRID, generator=g).to(dtype)
            text = torch.randn(1, text_tokens, 4096, generator=g).to(dtype)
            steps = inference_schedule(frames, [1000.0], "uniform")
            forward = lambda: rollout(model, noise, text, steps, 1, gradient_num_blocks=grad_blocks).x0  # noqa: E731
            held_for_backward(forward)
            measured = held_for_backward(forward)
            predicted = rollout_bytes(table.for_dtype(name), model.config, layers=2, batch=1, frames=frames,
                                      frames_per_block=1, grad_blocks=grad_blocks, tokens_per_frame=(GRID // 2) ** 2,
                                      text_tokens=text_tokens, checkpointing=checkpointing, dtype_bytes=dtype.itemsize)
            if checkpointing:  # the checkpoints reference the cache: it is held until backward too
                predicted += kv_cache_bytes(model.config, layers=2, batch=1, cached_frames=frames - 1,
                                            tokens_per_frame=(GRID // 2) ** 2, dtype_bytes=dtype.itemsize)
            rows.append(("student rollout", name, checkpointing, measured, predicted))

            # The tap reads layer 0's output, which layer 1's checkpoint keeps anyway, as the Wan configs'
            # taps (after blocks 21 and 29 of 30) are; a tap on the last layer would keep one more map.
            cfg = load_config(None, ["method.r1_weight=1.0", "method.r2_weight=0.001", "method.discriminator.feature_layers=[0]"])
            trunk = wan(2, dtype, False)
            critic = Critic(trunk, build_gan_heads(trunk, [0], num_registers=1, num_heads=12, ffn_dim=2048), [0])
            critic = critic.to(dtype) if dtype != torch.float32 else critic
            cast_like_from_pretrained(critic.trunk, dtype)
            if checkpointing:
                critic.enable_gradient_checkpointing()
            critic.train()
            shape = (1, 16, frames, GRID, GRID)
            batch = CriticBatch(*(torch.randn(shape, generator=g) for _ in range(2)), text.float(),
                                torch.tensor([400.0]), torch.randn(shape, generator=g), torch.tensor([600.0]),
                                *(torch.randn(shape, generator=g) for _ in range(3)), step=0)
            update = lambda: critic_losses(critic, batch, cfg.method)["critic_loss"].reshape(1)  # noqa: E731
            held_for_backward(update)
            measured = held_for_backward(update)
            predicted = critic_update_bytes(table.for_dtype(name), critic.trunk.config, layers=2, samples=1,
                                            tokens=frames * (GRID // 2) ** 2, text_tokens=text_tokens, feature_layers=[0],
                                            method=cfg.method, checkpointing=checkpointing, dtype_bytes=dtype.itemsize)
            rows.append(("critic update", name, checkpointing, measured, predicted))
    print(f"{'workload':16} {'dtype':9} {'checkpointed':12} {'measured MB':>12} {'predicted MB':>13} {'ratio':>6}")
    for workload, name, checkpointing, measured, predicted in rows:
        print(f"{workload:16} {name:9} {str(checkpointing):12} {measured / 2**20:12.1f} {predicted / 2**20:13.1f} "
              f"{predicted / measured:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.measure:
        measure(ACTIVATION_FILE)
    if args.check:
        check()


if __name__ == "__main__":
    main()
