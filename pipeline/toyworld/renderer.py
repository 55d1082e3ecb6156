"""The toy world's renderer: a prompt and a seed to a clip (frames, H, W, 3), float32 in [0, 1].

Anti-aliased sprites moving whole pixels per frame, with an optional fading trail and a brightening
border (WorldConfig says why). Image rows grow downwards, so "up" means decreasing row index.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from pipeline.toyworld.grammar import PALETTE, Scene, as_scene, format_prompt
from pipeline.toyworld.world import WorldConfig

# Unit displacement per frame in (row, col) for each direction.
_DIRECTION_STEP: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}


@functools.lru_cache(maxsize=64)
def _sprite(shape: str, size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel of a size x size box covered by the shape: (size, size), read-only.

    Sample centres never fall exactly on a shape's boundary, so the coverage is exact for the grid.
    """
    centres = (np.arange(size * supersample) + 0.5) / supersample
    v, u = centres[:, None], centres[None, :]
    if shape == "square":
        hit = np.ones((len(centres), len(centres)), bool)
    elif shape == "circle":
        hit = (u - size / 2) ** 2 + (v - size / 2) ** 2 <= (size / 2) ** 2
    else:  # triangle: apex at the top centre, base along the bottom edge
        hit = np.abs(u - size / 2) <= v / 2
    sprite = hit.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)
    sprite.setflags(write=False)
    return sprite


def _starts(direction: str, step: int, size: int, config: WorldConfig) -> np.ndarray:
    """Every start (top, left) keeping the box `margin` pixels inside the border in every frame: (N, 2)."""
    drow, dcol = (d * step * (config.frames - 1) for d in _DIRECTION_STEP[direction])
    m = config.margin + config.border
    tops = np.arange(m + max(0, -drow), config.height - m - size - max(0, drow) + 1)
    lefts = np.arange(m + max(0, -dcol), config.width - m - size - max(0, dcol) + 1)
    if config.start_at_edge:  # the start along the motion is the one nearest the trailing edge
        tops = tops[-1:] if drow < 0 else tops[:1] if drow > 0 else tops
        lefts = lefts[-1:] if dcol < 0 else lefts[:1] if dcol > 0 else lefts
    return np.stack(np.meshgrid(tops, lefts, indexing="ij"), -1).reshape(-1, 2)


def _apart(a: np.ndarray, size_a: int, b: np.ndarray, size_b: int, gap: int) -> np.ndarray:
    """Whether boxes at (top, left) a (Na, 2) and b (Nb, 2) keep `gap` pixels apart: (Na, Nb)."""
    a, b = a[:, None, :], b[None, :, :]
    return ((a + size_a + gap <= b) | (b + size_b + gap <= a)).any(-1)


@functools.lru_cache(maxsize=256)
def _valid_pairs(dir_a: str, dir_b: str, step: int, size_a: int, size_b: int, config_key: tuple) -> np.ndarray:
    """Index pairs (i, j) into the two objects' `_starts` that stay apart in every frame (cached: the
    enumeration is the slow part of rendering a two-object clip)."""
    config = WorldConfig(*config_key)
    a, b = _starts(dir_a, step, size_a, config), _starts(dir_b, step, size_b, config)
    move_a, move_b = (np.array(_DIRECTION_STEP[d]) * step for d in (dir_a, dir_b))
    ok = np.ones((len(a), len(b)), bool)
    for f in range(config.frames):
        ok &= _apart(a + f * move_a, size_a, b + f * move_b, size_b, config.min_gap)
    pairs = np.argwhere(ok)
    pairs.setflags(write=False)
    return pairs


def _place(scene: Scene, rng: np.random.Generator, config: WorldConfig) -> list[tuple[int, int, int]]:
    """(top, left, size) per object at frame 0, uniform over all placements that keep every object in
    the frame and two objects apart in every frame. Enumerated rather than rejection-sampled because
    some scenes (two fast objects crossing paths) have only a few dozen valid placements."""
    step = config.speed_pixels(scene.speed)
    jitter = config.size_jitter
    sizes = [config.object_size + int(rng.integers(-jitter, jitter + 1)) for _ in scene.objects]
    starts = [_starts(o.direction, step, size, config) for o, size in zip(scene.objects, sizes)]
    if len(scene.objects) == 1:
        top, left = starts[0][rng.integers(len(starts[0]))]
        return [(int(top), int(left), sizes[0])]
    (a, b), (oa, ob) = starts, scene.objects
    pairs = _valid_pairs(oa.direction, ob.direction, step, sizes[0], sizes[1], dataclasses.astuple(config))
    if len(pairs) == 0:
        raise ValueError(f"cannot place {format_prompt(scene)!r} without overlap: lower object_size or min_gap")
    i, j = pairs[rng.integers(len(pairs))]
    return [(int(a[i, 0]), int(a[i, 1]), sizes[0]), (int(b[j, 0]), int(b[j, 1]), sizes[1])]


def _moved(box: tuple[int, int, int], direction: str, distance: int) -> tuple[int, int, int]:
    drow, dcol = _DIRECTION_STEP[direction]
    return box[0] + drow * distance, box[1] + dcol * distance, box[2]


def _seed_for(scene: Scene, seed: int) -> np.random.Generator:
    # Mixing in a stable hash of the prompt means seed 0 of two prompts does not share positions.
    return np.random.default_rng([seed, zlib.crc32(format_prompt(scene).encode())])


def render(prompt_or_scene: str | Scene, seed: int, config: WorldConfig | None = None) -> np.ndarray:
    """Render a clip (frames, H, W, 3) float32 in [0, 1]; deterministic per (prompt, seed)."""
    config = config or WorldConfig()
    scene = as_scene(prompt_or_scene)
    if len(scene.objects) > config.max_objects:
        raise ValueError(f"prompt has {len(scene.objects)} objects but config.max_objects={config.max_objects}")
    boxes = _place(scene, _seed_for(scene, seed), config)
    step = config.speed_pixels(scene.speed)
    clip = np.empty((config.frames, config.height, config.width, 3), np.float32)
    clip[:] = np.asarray(config.background, np.float32)
    # Trails first, so an object is never painted over by another's trail.
    for layer in ("trail", "object"):
        for box, obj in zip(boxes, scene.objects):
            sprite = _sprite(obj.shape, box[2], config.supersample)
            colour = np.asarray(PALETTE[obj.colour], np.float32)
            for f in range(config.frames):
                top, left, size = _moved(box, obj.direction, step * f)
                if layer == "object":
                    alpha = np.zeros(clip.shape[1:3], np.float32)
                    alpha[top : top + size, left : left + size] = sprite
                else:
                    alpha = _trail(sprite, (top, left), obj.direction, step * config.trail_frames, config)
                clip[f] = clip[f] * (1 - alpha[..., None]) + colour * alpha[..., None]
    b = config.border
    if b:
        for f in range(config.frames):
            grey = config.border_first + (config.border_last - config.border_first) * f / max(1, config.frames - 1)
            for edge in (clip[f, :b], clip[f, -b:], clip[f, :, :b], clip[f, :, -b:]):
                edge[:] = grey
    return clip


def _trail(sprite: np.ndarray, top_left: tuple[int, int], direction: str, length: int, config: WorldConfig) -> np.ndarray:
    """Coverage (H, W) of the trail behind a sprite at `top_left`: copies shifted back 1..length px, the
    copy d px back at trail_alpha (1 - d / (length + 1)), combined by maximum (not stacked, so the
    trail never reaches the grader's foreground threshold); cut off at the frame border."""
    height, width = config.height, config.width
    size = sprite.shape[0]
    drow, dcol = _DIRECTION_STEP[direction]
    # Pad by the trail length so shifted copies may run off the frame, then crop.
    pad = length
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), np.float32)
    for d in range(1, length + 1):
        top, left = top_left[0] + pad - drow * d, top_left[1] + pad - dcol * d
        region = canvas[top : top + size, left : left + size]
        np.maximum(region, config.trail_alpha * (1 - d / (length + 1)) * sprite, out=region)
    return canvas[pad : pad + height, pad : pad + width]
