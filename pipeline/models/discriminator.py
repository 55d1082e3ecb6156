"""GAN heads on critic features, and the critic: one Wan trunk serving the fake score and the logits.

One-Forcing's discriminator: at chosen critic layers a learned register token cross-attends over all
video tokens of that layer, then an FFN; the register outputs of all taps are concatenated ->
LayerNorm -> Linear -> SiLU -> Linear -> one logit per sample. The trunk is shared with score matching,
so one critic forward gives both the velocity (fake score) and the logits.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipeline.models.causal_wan import CausalWanModel


class RegisterTap(nn.Module):
    """Registers (R, D) cross-attend over one layer's tokens (B, L, D), then a residual FFN."""

    def __init__(self, dim: int, num_registers: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.registers = nn.Parameter(torch.randn(num_registers, dim) / dim**0.5)
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        query = self.registers.expand(tokens.shape[0], -1, -1)
        if condition is not None:  # timestep conditioning: shift the registers by the timestep embedding
            query = query + condition[:, None, :]
        context = self.norm_tokens(tokens)
        attended, _ = self.attn(self.norm_query(query), context, context, need_weights=False)
        query = query + attended
        return query + self.ffn(self.norm_ffn(query))  # (B, R, D)


class GANHeads(ModelMixin, ConfigMixin):
    """Discriminator heads: `forward(features, timestep)` -> (B,) logits, one feature map per tap."""

    @register_to_config
    def __init__(
        self,
        feature_dim: int,
        num_taps: int,
        num_registers: int = 1,
        num_heads: int = 12,
        ffn_dim: int = 2048,
        hidden_dim: int = 2048,
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
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1)
        )

    def forward(self, features: list[torch.Tensor], timestep: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) != len(self.taps):
            raise ValueError(f"expected {len(self.taps)} feature maps, got {len(features)}")
        condition = None
        if self.time_embedder is not None:
            if timestep is None:
                raise ValueError("these GAN heads are timestep-conditioned: pass the timestep")
            freqs = self.time_proj(timestep.flatten()).to(features[0].dtype)
            condition = self.time_embedder(freqs)
        registers = [tap(f, condition).flatten(1) for tap, f in zip(self.taps, features)]
        return self.head(torch.cat(registers, dim=1)).squeeze(1)


class Critic(nn.Module):
    """The fake score (a bidirectional Wan trunk) and the GAN heads, trained together by one optimiser."""

    def __init__(self, trunk: CausalWanModel, heads: GANHeads, feature_layers: list[int]) -> None:
        super().__init__()
        if max(feature_layers) >= len(trunk.blocks):
            raise ValueError(f"feature layer {max(feature_layers)} >= the critic's {len(trunk.blocks)} blocks")
        if len(feature_layers) != len(heads.taps):
            raise ValueError(f"{len(feature_layers)} feature layers for {len(heads.taps)} GAN taps")
        self.trunk = trunk
        self.heads = heads
        self.feature_layers = tuple(sorted(feature_layers))

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, with_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(velocity, logits or None) from one trunk forward."""
        layers = self.feature_layers if with_logits else ()
        out = self.trunk(x_t, timestep, text, feature_layers=layers)
        logits = self.heads(out.features, timestep) if with_logits else None
        return out.sample, logits

    def logits(self, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.forward(x_t, timestep, text)[1]


def build_gan_heads(trunk: CausalWanModel, feature_layers: list[int], **kwargs) -> GANHeads:
    """Heads sized for `trunk` (feature dim = its inner dim)."""
    dim = trunk.config.num_attention_heads * trunk.config.attention_head_dim
    return GANHeads(feature_dim=dim, num_taps=len(feature_layers), **kwargs)
