"""Open-ended streams from a causal student: one block at a time for as long as the caller asks, the
prompt switchable between blocks, each block decoded alone. What a streaming server holds per stream.

    stream = LiveStream(ClipGenerator.load("runs/toy_distill/export"), "a red square moving left", seed=0)
    first = stream.next_frames()          # the first block's frames, (n, H, W, 3) in [0, 1]
    stream.switch_prompt("a blue circle moving up")
    later = stream.next_frames()          # generated under the new prompt; the cache keeps the past

The first `settings.num_blocks` blocks start from the noise `ClipGenerator.generate` uses for the same
prompt and seed, so a stream that never switches shows that clip; later blocks start from noise drawn
per block from the same seed. Past the clip's length, memory stays flat only with a cache window
(`generate.cache_window`, with `generate.sink_frames` of the first frames kept as an attention sink):
without one, the KV cache grows with every block, so `LiveStream` refuses to run past the clip
without it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import noise_seed, prompt_id
from pipeline.generation import ClipGenerator
from pipeline.models.codec import video_to_clips
from pipeline.rollout import BlockRollout


class LiveStream:
    """One stream's state: the rollout (KV cache), the codec's streaming decoder, the prompt's text and
    the count of blocks made."""

    def __init__(
        self, generator: ClipGenerator, prompt: str, seed: int, max_blocks: int | None = None,
        cache_window: int | None = None, sink_frames: int | None = None,
    ) -> None:
        """`cache_window` and `sink_frames` None: the generator's settings."""
        s = generator.settings
        limit = s.num_blocks if max_blocks is None else max_blocks
        window = s.cache_window if cache_window is None else cache_window or None
        sink = s.sink_frames if sink_frames is None else sink_frames
        if limit > s.num_blocks and not window:
            raise ValueError(f"a stream of {limit} blocks is longer than the clip ({s.num_blocks} blocks): set generate.cache_window")
        self.generator, self.max_blocks, self.prompt = generator, limit, prompt
        self.clip_noise, self.text, self.steps, renoise = generator.clip_inputs(prompt, seed)
        self.stream_id = noise_seed(prompt_id(prompt, seed))  # the first prompt and the seed fix every block's noise
        self.rollout = BlockRollout(generator.student, 1, generator.device, context_noise=s.context_noise, generator=renoise,
                                    cache_window=window, sink_frames=sink, fused=s.fused)
        self.decoder = generator.codec.stream_decoder()
        self.blocks = 0

    @property
    def done(self) -> bool:
        return self.blocks >= self.max_blocks

    def switch_prompt(self, prompt: str) -> None:
        """The next block on is generated under `prompt`."""
        self.text, self.prompt = self.generator.encode(prompt), prompt

    def _block_noise(self, block: int) -> torch.Tensor:
        s = self.generator.settings
        if block < s.num_blocks:
            return self.clip_noise[:, :, block * s.frames_per_block : (block + 1) * s.frames_per_block]
        shape = (1, self.clip_noise.shape[1], s.frames_per_block, s.latent_height, s.latent_width)
        g = torch.Generator().manual_seed((self.stream_id + block) % 2**63)
        return torch.randn(shape, generator=g).to(self.generator.device)

    def held_bytes(self) -> int:
        """Bytes of the tensors the stream keeps between blocks (its KV cache and the decoder's causal
        caches): flat past the clip with a cache window."""
        return held_tensor_bytes([self.rollout.cache, self.rollout.last, self.decoder])

    @torch.no_grad()
    def next_frames(self) -> np.ndarray:
        """The next block's frames (n, H, W, 3) in [0, 1]."""
        if self.done:
            raise RuntimeError(f"the stream has made its {self.max_blocks} blocks")
        block = self.blocks
        steps = self.steps[min(block, len(self.steps) - 1)]  # past the clip: the schedule's later blocks
        x0 = self.rollout.next_block(self._block_noise(block), self.text, steps)
        self.blocks += 1
        return video_to_clips(self.decoder.decode(x0.float()))[0]


def held_tensor_bytes(root: object) -> int:
    """Bytes of the tensor storages reachable from `root` through lists, tuples, dicts and object
    attributes (modules excluded; each storage counted once)."""
    seen, objects, total, stack = set(), set(), 0, [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and id(obj) not in objects:
            objects.add(id(obj))
            stack.extend(vars(obj).values())
    return total
