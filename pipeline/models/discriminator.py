"""GAN heads on critic features, and the critic: one Wan trunk serving the fake score and the logits.

One-Forcing's discriminator (DESIGN §3). At each tapped critic layer (the full token sequence after that
block) a learned register token, RMS-normed, is the single query of a cross-attention over the layer's
LayerNorm'd tokens: `q = RMSNorm(W_q r)`, `k = RMSNorm(W_k x)`, `v = W_v x`, multi-head, no RoPE, no mask,
output projection W_o, residual onto the register; then a residual FFN (Linear -> GELU(tanh) -> Linear)
on a non-affine LayerNorm. The registers of all taps are concatenated -> LayerNorm -> Linear(n·D -> D)
-> SiLU -> Linear -> one logit per sample. The trunk is shared with score matching, so one critic
forward gives both the velocity (fake score) and the logits.

Two options beyond the paper's head, both off by default: `num_registers > 1` (several registers per
tap, each an independent single query; all are concatenated) and `timestep_conditioning` (the timestep
embedding is added to the register before its RMSNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.models.causal_wan import CausalWanModel


class RegisterTap(nn.Module):
    """Learned registers (R, D) cross-attend over one layer's tokens (B, L, D), then a residual FFN."""

    def __init__(self, dim: int, num_registers: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.registers = nn.Parameter(torch.randn(num_registers, dim) / dim**0.5)
        self.norm_registers = nn.RMSNorm(dim, eps=1e-6)
        self.norm_tokens = nn.LayerNorm(dim, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        # q/k norms over the full width (not per head), as in Wan's own attention
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        self.norm_ffn = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, D), condition (B, D) or None -> registers (B, R, D)."""
        batch, length, dim = tokens.shape
        registers = self.registers.expand(batch, -1, -1)  # (B, R, D)
        if condition is not None:  # shift before the norm, so the query keeps the register's scale
            registers = registers + condition[:, None, :]
        registers = self.norm_registers(registers)
        context = self.norm_tokens(tokens)
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.norm_q(self.to_q(registers)).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, R, d)
        k = self.norm_k(self.to_k(context)).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(batch, length, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, dim)
        registers = registers + self.to_out(attended)
        return registers + self.ffn(self.norm_ffn(registers))


class GANHeads(ModelMixin, ConfigMixin):
    """Discriminator heads: `forward(features, timestep)` -> (B,) logits, one feature map per tap.

    `hidden_dim` is the width of the final MLP; None (the default) means the feature dim D, as in the
    paper's head. With gradient checkpointing on (`enable_gradient_checkpointing`), a tap keeps only its
    input, the trunk's feature map, and recomputes its normed tokens, keys and values (three more
    full-length maps) in backward.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        feature_dim: int,
        num_taps: int,
        num_registers: int = 1,
        num_heads: int = 12,
        ffn_dim: int = 2048,
        hidden_dim: int | None = None,
        timestep_conditioning: bool = False,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        self.taps = nn.ModuleList(
            [RegisterTap(feature_dim, num_registers, num_heads, ffn_dim) for _ in range(num_taps)]
        )
        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, feature_dim) if timestep_conditioning else None
        width = num_taps * num_registers * feature_dim
        hidden = feature_dim if hidden_dim is None else hidden_dim
        self.head = nn.Sequential(
            nn.LayerNorm(width, eps=1e-5), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )
        self.gradient_checkpointing = False

    def forward(self, features: list[torch.Tensor], timestep: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) != len(self.taps):
            raise ValueError(f"expected {len(self.taps)} feature maps, got {len(features)}")
        condition = None
        if self.time_embedder is not None:
            if timestep is None:
                raise ValueError("these GAN heads are timestep-conditioned: pass the timestep")
            freqs = self.time_proj(timestep.flatten()).to(features[0].dtype)
            condition = self.time_embedder(freqs)
        registers = [self._run_tap(tap, f, condition).flatten(1) for tap, f in zip(self.taps, features)]
        return self.head(torch.cat(registers, dim=1)).squeeze(1)

    def _run_tap(self, tap: RegisterTap, tokens: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(tap, tokens, condition)
        return tap(tokens, condition)


class Critic(nn.Module):
    """The fake score (a bidirectional Wan trunk) and the GAN heads, trained together by one optimiser.

    For the generator's feedback pass freeze it (`requires_grad_(False)`): gradients then reach only the
    sample, which is what a ZeRO-wrapped critic needs (DESIGN §4). Unfreeze for the critic update.
    """

    def __init__(self, trunk: CausalWanModel, heads: GANHeads, feature_layers: list[int]) -> None:
        super().__init__()
        if max(feature_layers) >= len(trunk.blocks):
            raise ValueError(f"feature layer {max(feature_layers)} >= the critic's {len(trunk.blocks)} blocks")
        if len(feature_layers) != len(heads.taps):
            raise ValueError(f"{len(feature_layers)} feature layers for {len(heads.taps)} GAN taps")
        self.trunk = trunk
        self.heads = heads
        self.feature_layers = tuple(sorted(feature_layers))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the trunk's blocks and the GAN taps in backward: activations of a few full-length
        maps per block instead of every intermediate."""
        self.trunk.enable_gradient_checkpointing()
        self.heads.enable_gradient_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The trunk's declared compute dtype; the heads run in it too (they read its features)."""
        return self.trunk.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        self.trunk.compute_dtype = dtype

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, with_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(velocity, logits or None) from one trunk forward; inputs are cast by the trunk, the logits
        come back in fp32."""
        layers = self.feature_layers if with_logits else ()
        out = self.trunk(x_t, timestep, text, feature_layers=layers)
        logits = self.heads(out.features, timestep).float() if with_logits else None
        return out.sample, logits

    def logits(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The GAN logits alone: the trunk stops at its last tapped block (the blocks after it and the
        velocity head would feed nothing the logits read)."""
        out = self.trunk(x_t, timestep, text, feature_layers=self.feature_layers, features_only=True)
        return self.heads(out.features, timestep).float()


def build_gan_heads(trunk: CausalWanModel, feature_layers: list[int], **kwargs) -> GANHeads:
    """Heads sized for `trunk` (feature dim = its inner dim); kwargs are GANHeads' remaining arguments."""
    dim = trunk.config.num_attention_heads * trunk.config.attention_head_dim
    return GANHeads(feature_dim=dim, num_taps=len(feature_layers), **kwargs)
