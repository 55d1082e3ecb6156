"""Wan2.1 DiT with bidirectional, block-causal and KV-cached attention.

`CausalWanModel` *is* diffusers' `WanTransformer3DModel`: same config, same submodules, same state-dict
keys, so a diffusers checkpoint directory loads strictly and our exports load in diffusers. What it adds
is how it can be called:

    model(x, t, text)                                  # bidirectional: teacher and critic (diffusers' output)
    model(x, t, text, frames_per_block=1)              # block-causal over the whole clip (ODE init, checks)
    cache = model.new_kv_cache()
    model(x_block, t, text, kv_cache=cache)            # one block attending to the cached clean blocks
    model(x_clean, t0, text, kv_cache=cache, update_cache=True)   # write the block's K/V into the cache
    model(x_two, t_frames, text, kv_cache=cache, frames_per_block=f, update_cache=True, write_frames=f)
                                                       # fused: write block k, predict block k+1, one call

Causality lives in the attention processors: a token in block b attends to every token of blocks <= b.
With a cache, the current block's queries attend to [cached K/V ; current K/V] and RoPE is applied at the
block's absolute frame position, so generating block by block equals the block-causal full forward.
`timestep` may be per sample (B,) or per latent frame (B, F). No mask is ever built: queries that see
the same keys form a query block, and each block is one attention call over just its keys (a prefix of
the clip, or the sink and the recent frames), so memory stays linear in the clip and every call can take
the flash kernel.

Long videos: a cache made with `window_frames` keeps the clip's first `sink_frames` latent frames for good
(the attention sink) and the most recent `window_frames - sink_frames`; the whole-clip forward takes the
same two numbers and limits each block's keys accordingly, so both still agree. One rule decides what a query frame sees
(`_visible_frames`), for the full, the cached and the fused forward alike.

The mode of a forward reaches the processors through a context variable set around each transformer block,
not through attributes on the processors: one model can serve forwards from several threads at once, and
a gradient-checkpoint recompute sees the context of the forward it recomputes. The processors must be
ours: after `set_attn_processor` the causal and cached modes raise until `install_causal_processors()`.

Precision: a model computes in its declared `compute_dtype` (float32 unless the loader or a bf16
DeepSpeed engine declares otherwise), never a dtype read off a parameter: diffusers keeps some modules
in float32 (`_keep_in_fp32_modules`), so a bf16 model's first parameter may well be float32. `forward`
casts its inputs to it; what it returns is in that dtype.

Dropped relative to the parent: image conditioning (I2V) in the causal and cached modes, and context
parallelism (`_cp_plan`) in those modes; both raise or are unused rather than silently ignored.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from diffusers.utils import BaseOutput

WAN_ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, which WanTransformer3DModel keeps


@dataclass
class KVCache:
    """Per layer, the self-attention K/V of each cached frame, plus the text K/V.

    `self_kv[layer]` holds one (K, V) pair per cached token frame (`patch_size[0]` latent frames; one with
    Wan2.1), in frame order, each (B, tokens_per_frame, heads, head_dim) with RoPE already applied to K.
    Every frame's K/V are stored once, as written: a write appends views of the forward's tensors and an
    eviction drops list entries, so nothing is ever copied. A forward that captured the cache earlier (a
    gradient-checkpoint recompute) keeps a list of references to those same tensors, never a copy of the
    cache as it was: what a rollout retains grows linearly with its frames. The text K/V are filled and
    reused only by forwards without grad: a forward with grad computes its own, so the text embedder and
    the cross-attention K/V projections get gradients.
    """

    self_kv: list[list[tuple[torch.Tensor, torch.Tensor]]]
    text_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    # Latent frames written so far: the absolute position (RoPE offset) of the next block. With a window
    # it keeps counting while old frames leave the cache, so positions never shift.
    num_frames: int = 0
    window_frames: int | None = None  # keep at most this many latent frames (sliding window); None = all
    sink_frames: int = 0  # of those, the clip's first frames, never evicted (attention sink)

    @classmethod
    def empty(cls, num_layers: int, window_frames: int | None = None, sink_frames: int = 0) -> KVCache:
        check_window(window_frames, sink_frames)
        return cls(
            self_kv=[[] for _ in range(num_layers)], text_kv=[None] * num_layers, window_frames=window_frames,
            sink_frames=sink_frames,
        )

    @property
    def cached_frames(self) -> int:
        return self.num_frames if self.window_frames is None else min(self.num_frames, self.window_frames)

    def frame_positions(self) -> list[int]:
        """The absolute latent frames whose K/V the cache holds, in storage order."""
        window, sink, n = self.window_frames, self.sink_frames, self.num_frames
        if window is None or n <= window:
            return list(range(n))
        return list(range(sink)) + list(range(n - (window - sink), n))

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One layer's cached K and V as (B, tokens, heads, head_dim) tensors (a copy), None when empty."""
        frames = self.self_kv[layer]
        if not frames:
            return None
        return torch.cat([k for k, _ in frames], 1), torch.cat([v for _, v in frames], 1)

    def append(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], frames: int, tokens_per_entry: int, frames_per_entry: int) -> None:
        """Store each layer's written K/V frame by frame, advance by `frames` latent frames, then drop what
        the window no longer keeps: the clip's first `sink_frames` and the most recent `window - sink`."""
        for stored, (key, value) in zip(self.self_kv, new_kv):
            stored.extend(zip(key.split(tokens_per_entry, 1), value.split(tokens_per_entry, 1)))
        self.num_frames += frames
        window, sink = self.window_frames, self.sink_frames
        if window is None or self.num_frames <= window:
            return
        head, tail = sink // frames_per_entry, (window - sink) // frames_per_entry
        self.self_kv = [stored[:head] + stored[-tail:] for stored in self.self_kv]


def check_window(window_frames: int | None, sink_frames: int) -> None:
    """A window keeps >= 1 frame and its sink leaves room for at least one recent frame."""
    if window_frames is None:
        if sink_frames:
            raise ValueError(f"sink_frames={sink_frames} needs a window (window_frames): without one every frame is kept")
        return
    if window_frames < 1:
        raise ValueError(f"window_frames must be >= 1, got {window_frames}")
    if not 0 <= sink_frames < window_frames:
        raise ValueError(f"sink_frames must be in [0, window_frames={window_frames}), got {sink_frames}")


def _visible_frames(
    query_frames: torch.Tensor, block_size: int, key_frames: torch.Tensor, window: int | None, sink: int
) -> torch.Tensor:
    """(Fq, Fk) bool: may a query at absolute frame i attend to a key at absolute frame j?

    The queries are consecutive frames split into blocks of `block_size` from the first of them. A query
    sees its own block and everything before it; with a window, of the frames before its block only the
    first `sink` of the clip and the most recent `window - sink`: exactly what a cache holds when the
    query's block is generated."""
    first = query_frames[:1]
    start = (first + (query_frames - first) // block_size * block_size)[:, None]
    keys = key_frames[None, :]
    visible = keys < start + block_size
    if window is not None:
        visible &= (keys < sink) | (keys >= start - (window - sink))
    return visible


@dataclass(frozen=True)
class _QueryBlock:
    """Queries that see the same keys: a token range of the current input, and the token ranges of the
    [cached ; current] keys they attend to (the sink and the recent frames are two ranges)."""

    queries: slice
    keys: tuple[slice, ...]


@dataclass
class _AttentionCall:
    """What the processors of one forward need beyond their inputs; captured per call."""

    # Block-causal structure as one attention call per group of queries, over only the keys they see:
    # no mask, so no (L, L) tensor and the fastest kernel for each call. None: every query sees every key.
    query_blocks: list[_QueryBlock] | None = None
    past_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # per layer, per frame
    new_kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # filled when writing the cache
    write_tokens: int | None = None  # the first this many current tokens are written (None: all)
    # The cache's text K/V, read and filled in place; None (compute them afresh) when the forward carries
    # grad, whose cached copy would have no graph and whose own copy must not outlive the step.
    text_kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


def _query_blocks(visible: torch.Tensor, tokens_per_frame: int) -> list[_QueryBlock] | None:
    """`visible` (query frames, key frames) as query blocks in tokens: consecutive query frames that see
    the same key frames form one block, the runs of visible key frames its key ranges."""
    if visible.all():
        return None
    rows, blocks, first = visible.tolist(), [], 0
    for end in range(1, len(rows) + 1):
        if end < len(rows) and rows[end] == rows[first]:
            continue
        runs, start = [], None
        for j, seen in enumerate([*rows[first], False]):
            if seen and start is None:
                start = j
            elif not seen and start is not None:
                runs.append(slice(start * tokens_per_frame, j * tokens_per_frame))
                start = None
        blocks.append(_QueryBlock(slice(first * tokens_per_frame, end * tokens_per_frame), tuple(runs)))
        first = end
    return blocks


# The `_AttentionCall` of the transformer block running in this thread (None: bidirectional). Set per
# block by `CausalWanModel._run_block`, so a checkpoint recompute during backward sets it again.
_CURRENT_CALL: ContextVar[_AttentionCall | None] = ContextVar("causal_wan_attention_call", default=None)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE (pairs (0,1), (2,3), ...); identical to diffusers' WanAttnProcessor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _key_value(attn: WanAttention, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, heads, head_dim) K and V of `source`, K normed as diffusers does."""
    key = attn.norm_k(attn.to_k(source)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(source).unflatten(2, (attn.heads, -1))
    return key, value


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) layout in and out, like diffusers' dispatch_attention_fn."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _key_ranges(x: torch.Tensor, ranges: tuple[slice, ...]) -> torch.Tensor:
    """The tokens of `x` (B, L, ...) in `ranges`: a view when they are one range."""
    return x[:, ranges[0]] if len(ranges) == 1 else torch.cat([x[:, r] for r in ranges], 1)


def _block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[_QueryBlock] | None
) -> torch.Tensor:
    """Attention of each query block over its key ranges, one call per block (what a dense block-causal
    mask would give, without building it; backward keeps views of `k`/`v`, not a copy per block)."""
    if blocks is None:
        return _attend(q, k, v)
    return torch.cat([_attend(q[:, b.queries], _key_ranges(k, b.keys), _key_ranges(v, b.keys)) for b in blocks], 1)


class CausalWanAttnProcessor:
    """Self- or cross-attention processor for one layer that reads the current `_AttentionCall`.

    With no call context it defers to diffusers' own `WanAttnProcessor`, so the bidirectional model is
    exactly diffusers' model. It holds no per-call state: only which layer and which attention it serves.
    """

    def __init__(self, layer: int, cross: bool) -> None:
        self.layer = layer
        self.cross = cross
        self._diffusers = WanAttnProcessor()

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        call = _CURRENT_CALL.get()
        if call is None:
            return self._diffusers(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.add_k_proj is not None:
            raise NotImplementedError("image conditioning (I2V) is not supported in causal or cached mode")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if self.cross:
            key, value = self._text_key_value(attn, encoder_hidden_states, call.text_kv)
            out = _attend(query, key, value)
        else:
            key, value = _key_value(attn, hidden_states)
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)
            out = self._self_attention(call, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _text_key_value(
        self, attn: WanAttention, text: torch.Tensor, cached: list[tuple[torch.Tensor, torch.Tensor] | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cached is None:  # a forward with grad: its own K/V, with their graph
            return _key_value(attn, text)
        if cached[self.layer] is None:  # the prompt's K/V are computed once per cache
            cached[self.layer] = _key_value(attn, text)
        return cached[self.layer]

    def _self_attention(
        self, call: _AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        if call.new_kv is not None:
            write = slice(None, call.write_tokens)
            call.new_kv[self.layer] = (key[:, write], value[:, write])
        past = call.past_kv[self.layer] if call.past_kv else []
        if past:  # a transient copy: the cache keeps its frames, a checkpoint its references to them
            key = torch.cat([*(k for k, _ in past), key], dim=1)
            value = torch.cat([*(v for _, v in past), value], dim=1)
        return _block_causal_attention(query, key, value, call.query_blocks)


class CausalWanOutput(BaseOutput):
    sample: torch.Tensor
    features: list[torch.Tensor] | None = None  # (B, L, dim) after each block in `feature_layers`


class CausalWanModel(WanTransformer3DModel):
    __doc__ = __doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_dtype = torch.float32  # declared by whoever casts the model (see the module doc)
        self.install_causal_processors()

    # diffusers reads a model's config keys off its __init__ signature: expose the parent's.
    __init__.__signature__ = inspect.signature(WanTransformer3DModel.__init__)

    def install_causal_processors(self) -> None:
        """Put our processors back (e.g. after `set_attn_processor`); the causal modes need them."""
        for i, block in enumerate(self.blocks):
            block.attn1.set_processor(CausalWanAttnProcessor(i, cross=False))
            block.attn2.set_processor(CausalWanAttnProcessor(i, cross=True))

    def _check_causal_processors(self) -> None:
        """Any other processor would ignore the call context and attend bidirectionally without a word."""
        for i, block in enumerate(self.blocks):
            for name, cross in (("attn1", False), ("attn2", True)):
                processor = getattr(block, name).processor
                ours = isinstance(processor, CausalWanAttnProcessor)
                if not ours or (processor.layer, processor.cross) != (i, cross):
                    raise RuntimeError(
                        f"blocks.{i}.{name} runs {type(processor).__name__}, not this layer's CausalWanAttnProcessor "
                        "(replaced by set_attn_processor?): block-causal and cached forwards need it; call "
                        "install_causal_processors() first"
                    )

    def new_kv_cache(self, window_frames: int | None = None, sink_frames: int = 0) -> KVCache:
        """An empty cache; `window_frames` bounds it (long videos) to the clip's first `sink_frames` latent
        frames and the most recent `window_frames - sink_frames`."""
        return KVCache.empty(len(self.blocks), window_frames, sink_frames)

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        *,
        frames_per_block: int | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
        feature_layers: tuple[int, ...] = (),
        window_frames: int | None = None,
        sink_frames: int = 0,
        write_frames: int | None = None,
        features_only: bool = False,
    ) -> CausalWanOutput | tuple[torch.Tensor, ...]:
        """Velocity prediction for `hidden_states` (B, C, F, H, W) at `timestep` (B,) or (B, F).

        Without a cache, `window_frames` and `sink_frames` (with `frames_per_block`) limit what each block
        sees of the frames before it as `new_kv_cache(window_frames, sink_frames)` does: the whole-clip
        equivalent of generating with that cache. With a cache, `frames_per_block` splits the input into
        blocks that are causal among themselves, and `update_cache` writes the K/V of the first
        `write_frames` latent frames (default: all) into the cache. `features_only`: stop after the last
        of `feature_layers` and return no sample (the blocks after it and the head would feed nothing)."""
        if features_only and (not feature_layers or update_cache):
            raise ValueError("features_only needs feature_layers and no cache update (the later blocks would not write)")
        if frames_per_block is None and kv_cache is None:
            if window_frames is not None or sink_frames:
                raise ValueError("window_frames and sink_frames need frames_per_block (a block-causal forward)")
            call = None  # bidirectional: diffusers' processors, exactly
        else:
            self._check_causal_processors()
            call = self._attention_call(
                hidden_states, frames_per_block, kv_cache, update_cache, window_frames, sink_frames, write_frames
            )
        if call is not None and encoder_hidden_states_image is not None:
            raise NotImplementedError("image conditioning (I2V) is not supported in causal or cached mode")
        hidden_states = hidden_states.to(self.compute_dtype)  # the model boundary: inputs in its dtype
        encoder_hidden_states = encoder_hidden_states.to(self.compute_dtype)
        frame_offset = kv_cache.num_frames if kv_cache is not None else 0
        sample, features = self._run(hidden_states, timestep, encoder_hidden_states, call, frame_offset, feature_layers,
                                     features_only)
        if kv_cache is not None:
            if call.text_kv is not None:
                kv_cache.text_kv = call.text_kv
            if update_cache:
                self._write(kv_cache, call, hidden_states, write_frames)
        if not return_dict:
            return (sample,) if not feature_layers else (sample, features)
        return CausalWanOutput(sample=sample, features=features or None)

    def _write(self, cache: KVCache, call: _AttentionCall, x: torch.Tensor, write_frames: int | None) -> None:
        """Store this forward's written K/V frame by frame; the cache advances and applies its window."""
        p_t = self.config.patch_size[0]
        frames = x.shape[2] if write_frames is None else write_frames
        cache.append(call.new_kv, frames, self.tokens_per_frame(*x.shape[3:]), p_t)

    def _attention_call(
        self, x: torch.Tensor, frames_per_block: int | None, kv_cache: KVCache | None, update_cache: bool,
        window_frames: int | None, sink_frames: int, write_frames: int | None,
    ) -> _AttentionCall:
        num_frames, height, width = x.shape[2:]
        block = frames_per_block or num_frames  # a cached forward without it is one block
        if num_frames % block:
            raise ValueError(f"{num_frames} latent frames do not split into blocks of {frames_per_block}")
        if kv_cache is None:
            if update_cache or write_frames is not None:
                raise ValueError("update_cache=True needs a kv_cache")
            check_window(window_frames, sink_frames)
            blocks = self._frame_blocks(x, 0, block, torch.arange(num_frames), window_frames, sink_frames)
            return _AttentionCall(query_blocks=blocks)
        if window_frames is not None or sink_frames:
            raise ValueError("pass either kv_cache (whose window and sink it keeps) or window_frames/sink_frames, not both")
        if write_frames is not None and (not update_cache or write_frames % block or not 0 < write_frames <= num_frames):
            raise ValueError(f"write_frames={write_frames} needs update_cache=True and whole blocks of {block} of the {num_frames} frames")
        start = kv_cache.num_frames
        keys = torch.tensor(kv_cache.frame_positions() + list(range(start, start + num_frames)), dtype=torch.long)
        blocks = self._frame_blocks(x, start, block, keys, kv_cache.window_frames, kv_cache.sink_frames)
        tokens = self.tokens_per_frame(height, width) // self.config.patch_size[0]
        new_kv = [None] * len(self.blocks) if update_cache else None
        # Decided once here, outside any checkpoint, so a recompute runs the same ops as the forward.
        text_kv = None if torch.is_grad_enabled() else list(kv_cache.text_kv)
        return _AttentionCall(
            query_blocks=blocks, past_kv=[list(frames) for frames in kv_cache.self_kv], new_kv=new_kv, text_kv=text_kv,
            write_tokens=None if write_frames is None else write_frames * tokens,
        )

    def _frame_blocks(
        self, x: torch.Tensor, start: int, block: int, key_frames: torch.Tensor, window: int | None, sink: int
    ) -> list[_QueryBlock] | None:
        """`_visible_frames` for queries at latent frames [start, start + F) as query blocks, None when
        every query sees every key (a single cached block: one plain attention call)."""
        p_t = self.config.patch_size[0]
        queries = torch.arange(start, start + x.shape[2], p_t)
        visible = _visible_frames(queries // p_t, block // p_t, key_frames[::p_t] // p_t,
                                  None if window is None else window // p_t, sink // p_t)
        return _query_blocks(visible, self.tokens_per_frame(*x.shape[3:]))

    def _rope(self, x: torch.Tensor, frame_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' RoPE table (WanRotaryPosEmbed) for latent frames [frame_offset, frame_offset + F)."""
        rope = self.rope
        p_t, p_h, p_w = rope.patch_size
        frames, height, width = x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w
        if frame_offset == 0 and frames <= rope.max_seq_len:
            return self.rope(x)
        sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        tables = []
        for table, f in zip((rope.freqs_cos, rope.freqs_sin), self._temporal_rope(frame_offset // p_t, frames)):
            _, h, w = table.split(sizes, dim=1)
            grid = (
                f.view(frames, 1, 1, -1).expand(frames, height, width, -1),
                h[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                w[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
            )
            tables.append(torch.cat(grid, dim=-1).reshape(1, frames * height * width, 1, -1))
        return tables[0], tables[1]

    def _temporal_rope(self, start: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The temporal (cos, sin) rows of latent frames [start, start + frames). The table holds
        `rope_max_seq_len` positions (1024 in Wan's configs); a stream with a cache window goes past them
        after 1024 latent frames (about four minutes of 16 fps video), so rows past the table are computed
        the way diffusers computed the table's (its default theta, which Wan uses), not cut short."""
        rope = self.rope
        cos, sin = (table[:, :rope.t_dim] for table in (rope.freqs_cos, rope.freqs_sin))
        if start + frames <= rope.max_seq_len:
            return cos[start:start + frames], sin[start:start + frames]
        positions = torch.arange(start, start + frames, dtype=torch.float64)
        far_cos, far_sin = get_1d_rotary_pos_embed(rope.t_dim, positions, WAN_ROPE_THETA, use_real=True,
                                                   repeat_interleave_real=True, freqs_dtype=torch.float64)
        return far_cos.to(cos), far_sin.to(sin)

    def _run(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        call: _AttentionCall | None,
        frame_offset: int,
        feature_layers: tuple[int, ...],
        features_only: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        batch, _, num_frames, height, width = x.shape
        p_t, p_h, p_w = self.config.patch_size
        rotary_emb = self._rope(x, frame_offset)

        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        if timestep.ndim == 2:  # per latent frame -> per token, diffusers' Wan2.2 per-token path
            timestep = timestep[:, :: p_t].repeat_interleave(self.tokens_per_frame(height, width), dim=1)
        ts_seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, text, _ = self.condition_embedder(
            timestep.flatten() if ts_seq_len else timestep, text, None, timestep_seq_len=ts_seq_len
        )
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len else 1, (6, -1))

        features = []
        last = max(feature_layers) if features_only else len(self.blocks) - 1
        for i, block in enumerate(self.blocks[: last + 1]):
            tokens = self._run_block(block, call, tokens, text, timestep_proj, rotary_emb)
            if i in feature_layers:
                features.append(tokens)
        if features_only:
            return None, features

        if temb.ndim == 3:
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.proj_out(tokens)
        tokens = tokens.reshape(batch, num_frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        sample = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return sample, features

    def _run_block(self, block, call, tokens, text, timestep_proj, rotary_emb) -> torch.Tensor:
        """One transformer block with this call's attention context current. `run` holds `call` itself
        and sets it on every run, so a checkpoint recompute in backward sees this forward's context."""

        def run(tokens: torch.Tensor) -> torch.Tensor:
            token = _CURRENT_CALL.set(call)
            try:
                return block(tokens, text, timestep_proj, rotary_emb)
            finally:
                _CURRENT_CALL.reset(token)

        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(run, tokens)
        return run(tokens)
