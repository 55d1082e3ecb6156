"""Self-forcing rollout of the causal student: block by block on its own outputs, with a KV cache.

Training and inference share `iter_blocks`. For each block of `frames_per_block` latent frames:
  1. start from pure noise and walk the block's step list; each step predicts x0 and, unless it is the
     exit step, re-noises it to the next timestep with fresh noise;
  2. the exit step's prediction is the block's output; only the last `gradient_num_blocks` blocks run
     that one forward with grad, everything else runs under no_grad;
  3. the clean block is run once more at t = `context_noise`, without grad, to write its K/V into the
     cache (skipped after the last block: nothing reads it).
So a one-step rollout of N blocks costs 2N - 1 model calls and a four-step one 5N - 1.

`fused=True` (inference) does step 3 of block k inside the first step of block k+1: one call over
[block k at `context_noise` ; block k+1 at its first t], block-causal inside, per-frame timesteps, writing
block k's K/V and predicting block k+1. A one-step rollout then costs N calls, a four-step one 4N. Only
that first step can carry the write (later steps need the cache as it is after it), and a step with grad
is never fused: its graph would reach the written K/V, so it keeps the two calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from pipeline.flow import add_noise, warp_timesteps, x0_from_velocity


class CausalStudent(Protocol):
    """What the rollout needs of a model; `CausalWanModel` implements it."""

    def new_kv_cache(self, window_frames: int | None = None, sink_frames: int = 0): ...

    def __call__(
        self, hidden_states, timestep, encoder_hidden_states, *, kv_cache, update_cache=False, frames_per_block=None,
        write_frames=None,
    ): ...


@dataclass
class RolloutOutput:
    x0: torch.Tensor  # (B, C, F, H, W); frames from `first_grad_frame` on carry grad
    first_grad_frame: int  # == F when nothing carries grad


def training_steps(denoising_steps: Sequence[float], shift: float, warp: bool) -> list[float]:
    """The per-block step list used in training, warped through the shift when asked."""
    return warp_timesteps(denoising_steps, shift) if warp else [float(t) for t in denoising_steps]


def inference_schedule(
    num_blocks: int, steps: Sequence[float], schedule: Literal["uniform", "first4then1"]
) -> list[list[float]]:
    """`uniform`: every block walks `steps`. `first4then1`: the first block walks `steps` (the four-step
    list), every later block takes the single step `steps[0]` (pure noise, t = 1000 warped)."""
    if schedule == "uniform":
        return [list(steps) for _ in range(num_blocks)]
    if schedule == "first4then1":
        return [list(steps)] + [[steps[0]] for _ in range(num_blocks - 1)]
    raise ValueError(f"unknown inference schedule '{schedule}'")


def draw_exit_steps(
    num_blocks: int, num_steps: int, generator: torch.Generator, same_across_blocks: bool = True
) -> list[int]:
    """Which step of each block's list ends it (and carries grad). Seed `generator` identically on every
    rank (e.g. from the run seed and the step counter) so all ranks draw the same exits."""
    count = 1 if same_across_blocks else num_blocks
    draws = torch.randint(0, num_steps, (count,), generator=generator).tolist()
    return draws * num_blocks if same_across_blocks else draws


class BlockRollout:
    """One rollout's state between blocks: the KV cache and the last block, whose context is written into
    the cache when the next block starts (inside that block's first call when `fused`). `iter_blocks`
    drives it over a fixed clip; a live stream drives it block by block for as long as it runs, with a
    prompt that may change between blocks (`text`): a block's context is written with the text it was
    generated under, so the cache keeps the past as it was (fused only while the text stays the same)."""

    def __init__(
        self, student: CausalStudent, batch: int, device: torch.device, *, context_noise: float = 0.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None, cache_window: int | None = None,
        sink_frames: int = 0, fused: bool = False,
    ) -> None:
        self.student, self.generator, self.fused, self.context_noise = student, generator, fused, context_noise
        self.cache = student.new_kv_cache(cache_window, sink_frames)
        self.context_t = torch.full((batch,), float(context_noise), device=device)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, text) of the previous block
        self.cache_text: torch.Tensor | None = None  # whose cross-attention K/V the cache holds (no-grad calls keep them)

    def _text(self, text: torch.Tensor) -> torch.Tensor:
        """`text`, with the cache's text K/V dropped when they were another text's."""
        if self.cache_text is not None and self.cache_text is not text:
            self.cache.text_kv = [None] * len(self.cache.text_kv)
        self.cache_text = text
        return text

    def next_block(
        self, x_t: torch.Tensor, text: torch.Tensor, steps: Sequence[float], exit_index: int | None = None, with_grad: bool = False,
    ) -> torch.Tensor:
        """The clean x0 (B, C, frames, H, W) of the block that starts from noise `x_t`."""
        student, cache, context_t = self.student, self.cache, self.context_t
        pending = None  # the previous block's context, not yet in the cache
        if self.last is not None:
            previous, previous_text = self.last
            context = _context(previous.detach(), self.context_noise, context_t, self.generator)  # its noise is drawn here either way
            if self.fused and previous_text is text:
                pending = context
            else:
                _write_cache(student, cache, context, context_t, self._text(previous_text))
        text = self._text(text)
        exit_index = len(steps) - 1 if exit_index is None else exit_index
        batch = x_t.shape[0]
        for i, t in enumerate(steps[: exit_index + 1]):
            is_exit = i == exit_index
            t_batch = torch.full((batch,), float(t), device=x_t.device)
            if pending is not None and is_exit and with_grad:
                _write_cache(student, cache, pending, context_t, text)
                pending = None
            grad_context = contextlib.nullcontext() if (is_exit and with_grad) else torch.no_grad()
            with grad_context:
                if pending is not None:
                    v = _fused_step(student, cache, pending, context_t, x_t, t_batch, text)
                    pending = None
                else:
                    v = student(x_t, t_batch, text, kv_cache=cache).sample
                x0 = x0_from_velocity(x_t, v, t_batch)
            if not is_exit:
                fresh = fresh_noise(x0, self.generator)
                x_t = add_noise(x0, fresh, steps[i + 1])
        self.last = (x0, text)
        return x0


def iter_blocks(
    student: CausalStudent,
    noise: torch.Tensor,
    text: torch.Tensor,
    steps_per_block: Sequence[Sequence[float]],
    frames_per_block: int,
    *,
    exit_steps: Sequence[int] | None = None,
    gradient_num_blocks: int = 0,
    context_noise: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cache_window: int | None = None,
    sink_frames: int = 0,
    fused: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield each block's clean x0 (B, C, frames_per_block, H, W) as soon as it is produced.

    `noise` (B, C, F, H, W) holds the starting noise of every block; `exit_steps[b]` is the index in
    block b's step list whose prediction is kept (default: the last step); `generator` drives the
    re-noising between steps: one for the batch, or one per sample (a sample's draws then do not
    depend on its batch-mates: training seeds them per global sample index). `cache_window` keeps only
    that many latent frames of context (sliding window, for clips longer than training), the first
    `sink_frames` of the clip among them for good; positions stay absolute. `fused`: see the module doc.
    """
    num_blocks = len(steps_per_block)
    if noise.shape[2] != num_blocks * frames_per_block:
        raise ValueError(f"noise has {noise.shape[2]} frames, expected {num_blocks} blocks x {frames_per_block}")
    state = BlockRollout(student, noise.shape[0], noise.device, context_noise=context_noise, generator=generator,
                         cache_window=cache_window, sink_frames=sink_frames, fused=fused)
    for block, steps in enumerate(steps_per_block):
        x_t = noise[:, :, block * frames_per_block : (block + 1) * frames_per_block]
        yield state.next_block(x_t, text, steps, None if exit_steps is None else exit_steps[block],
                               with_grad=block >= num_blocks - gradient_num_blocks)


def fresh_noise(like: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, from one generator or one per sample (drawn on the CPU
    generator's device, then moved)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generator]).to(like.device)


def _context(x0: torch.Tensor, context_noise: float, context_t: torch.Tensor, generator) -> torch.Tensor:
    """The clean block as the cache sees it: re-noised to t = `context_noise` (as `context_t`) when > 0."""
    if context_noise <= 0:  # decided on the float: no device sync
        return x0
    return add_noise(x0, fresh_noise(x0, generator), context_t)


def _write_cache(student, cache, context: torch.Tensor, context_t: torch.Tensor, text: torch.Tensor) -> None:
    with torch.no_grad():
        student(context, context_t, text, kv_cache=cache, update_cache=True)


def _fused_step(student, cache, context, context_t, x_t, t_batch, text) -> torch.Tensor:
    """Velocity of `x_t` (block k+1) from one call that also writes `context` (block k) into the cache."""
    frames = context.shape[2]
    timestep = torch.cat([context_t[:, None].expand(-1, frames), t_batch[:, None].expand(-1, frames)], dim=1)
    out = student(
        torch.cat([context, x_t], dim=2), timestep, text, kv_cache=cache, frames_per_block=frames,
        update_cache=True, write_frames=frames,
    )
    return out.sample[:, :, frames:]


def rollout(
    student: CausalStudent,
    noise: torch.Tensor,
    text: torch.Tensor,
    steps_per_block: Sequence[Sequence[float]],
    frames_per_block: int,
    **kwargs,
) -> RolloutOutput:
    """The whole clip from `iter_blocks`, concatenated along frames."""
    blocks = list(iter_blocks(student, noise, text, steps_per_block, frames_per_block, **kwargs))
    grad_blocks = min(kwargs.get("gradient_num_blocks", 0), len(blocks))
    return RolloutOutput(
        x0=torch.cat(blocks, dim=2), first_grad_frame=(len(blocks) - grad_blocks) * frames_per_block
    )
