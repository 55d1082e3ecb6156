"""The toy world's grader: from pixels alone to the objects on screen, a grade per clip against its
prompt, and a Fréchet distance of simple features between sets of clips.

It reads clips, never the renderer's internals: `render` is used only to make ground truth (the
sharpness reference and the Fréchet reference set), and the geometry comes from WorldConfig.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import linalg, ndimage

from pipeline.toyworld.grammar import COLOURS, PALETTE, SHAPES, Scene, as_scene, format_prompt
from pipeline.toyworld.renderer import render
from pipeline.toyworld.world import FOREGROUND_ALPHA, WorldConfig, interior

MAX_RESIDUAL = 0.2  # ... and lies within this RGB distance of that colour's blend line
MIN_AREA_FRACTION = 0.2  # an object needs a core of at least this fraction of object_size**2 pixels
MIN_PRESENCE = 0.5  # ... in at least this fraction of frames
# Shape is read by template matching (`_shape_scores`): the soft mask is compared with each shape of the
# same area and centroid. Unlike a bounding-box fill ratio, this shrugs off one-pixel streaks on an edge,
# which widen a bounding box by a whole pixel but cost a template match only their own small area.
TEMPLATE_SUPERSAMPLE = 4
# Area of each shape relative to its bounding box (triangle: apex at top centre, base along the bottom),
# and where its area centroid sits in that box, as fractions of the side (row, col).
_SHAPE_AREA = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
_SHAPE_CENTROID = {"square": (0.5, 0.5), "circle": (0.5, 0.5), "triangle": (2 / 3, 0.5)}
MIN_DISPLACEMENT = 0.5  # pixels per clip below which an object counts as static (direction "none")
SHARPNESS_REFERENCE_SEEDS = 4
OFF_PALETTE_DISTANCE = 0.25  # RGB distance from background beyond which a non-palette pixel is "off"
COLOUR_DRIFT_SCALE = 0.5 * min(
    float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b]))) for a, b in itertools.combinations(COLOURS, 2)
)


@dataclass(frozen=True)
class DetectedObject:
    """What the grader recovers of one object from pixels alone."""

    colour: str
    shape: str
    direction: str  # one of DIRECTIONS, or "none" when it barely moves
    speed: str  # one of SPEEDS, or "none"
    shape_scores: tuple[float, ...]  # per SHAPES, median over frames of the template match (soft IoU)
    displacement: tuple[float, float]  # centroid (rows, cols), first to last present frame
    areas: tuple[float, ...]  # soft area per frame, 0 where absent
    presence: float  # fraction of frames where it was found
    area_stability: float
    colour_stability: float
    motion_smoothness: float


def _unmix(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain each pixel (..., 3) as background blended with one palette colour.

    Returns per-pixel (label index into COLOURS, blend weight alpha per colour (..., K), residual of the
    chosen colour). Treating anti-aliased edges and a generator's washed-out colours as blends keeps
    them on the right colour instead of calling them a different one.
    """
    palette = np.asarray([PALETTE[c] for c in COLOURS], np.float64) - background  # (K, 3)
    delta = pixels.astype(np.float64) - background  # (..., 3)
    alpha = np.clip(delta @ palette.T / (palette**2).sum(1), 0.0, 1.0)  # (..., K)
    residual = np.sqrt(((delta[..., None, :] - alpha[..., None] * palette) ** 2).sum(-1))  # (..., K)
    label = residual.argmin(-1)
    return label, alpha, np.take_along_axis(residual, label[..., None], -1)[..., 0]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if empty): drops speckles."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (sizes.argmax() + 1)


def _fill_ratio(soft: np.ndarray, core: np.ndarray) -> float:
    """Soft area over the bounding box of the soft mask; the box edges are soft too (summed column and row
    maxima), so partly covered edge pixels count by their coverage, not all or nothing."""
    width = soft.max(axis=0).sum()
    height = soft.max(axis=1).sum()
    return float(soft.sum() / max(width * height, 1e-6)) if core.any() else 0.0


class _FrameMeasure(NamedTuple):
    core_pixels: int  # pixels confidently of this colour, in its largest connected piece
    area: float  # soft area: coverage summed over the core and its one-pixel rim
    centroid: tuple[float, float]  # (row, col), coverage-weighted
    colour: np.ndarray  # mean RGB over the core
    shape_scores: np.ndarray  # (len(SHAPES),) soft IoU with each shape's template


def _measure_frame(
    frame: np.ndarray, k: int, label: np.ndarray, alpha: np.ndarray, residual: np.ndarray
) -> _FrameMeasure:
    """Where and what colour k's object is in one frame, given that frame's `_unmix`."""
    core = _largest_component((label == k) & (alpha[..., k] >= FOREGROUND_ALPHA) & (residual <= MAX_RESIDUAL))
    # The soft coverage reaches one pixel beyond the core, to take in the anti-aliased rim.
    soft = alpha[..., k] * ndimage.binary_dilation(core, structure=np.ones((3, 3)))
    area = float(soft.sum())
    rows, cols = np.indices(soft.shape)
    centroid = (float((soft * rows).sum() / area), float((soft * cols).sum() / area)) if area > 0 else (np.nan, np.nan)
    colour = frame[core].mean(0) if core.any() else np.full(3, np.nan)
    return _FrameMeasure(int(core.sum()), area, centroid, colour, _shape_scores(soft, area, centroid))


def _template(shape: str, area: float, centroid: tuple[float, float], frame_shape: tuple[int, int]) -> np.ndarray:
    """Coverage (H, W) of `shape` scaled to `area` pixels with its area centroid at `centroid`."""
    side = np.sqrt(area / _SHAPE_AREA[shape])
    top = centroid[0] - _SHAPE_CENTROID[shape][0] * side
    left = centroid[1] - _SHAPE_CENTROID[shape][1] * side
    ss = TEMPLATE_SUPERSAMPLE
    offsets = (np.arange(ss) + 0.5) / ss - 0.5  # sample points inside a pixel, around its centre
    v = (np.arange(frame_shape[0])[:, None] + offsets[None, :]).ravel()[:, None] - top  # rows in the box
    u = (np.arange(frame_shape[1])[:, None] + offsets[None, :]).ravel()[None, :] - left  # cols in the box
    inside = (v >= 0) & (v <= side) & (u >= 0) & (u <= side)
    if shape == "circle":
        inside &= (u - side / 2) ** 2 + (v - side / 2) ** 2 <= (side / 2) ** 2
    elif shape == "triangle":
        inside &= np.abs(u - side / 2) <= v / 2
    return inside.reshape(frame_shape[0], ss, frame_shape[1], ss).mean(axis=(1, 3))


def _shape_scores(soft: np.ndarray, area: float, centroid: tuple[float, float]) -> np.ndarray:
    """Soft IoU (sum of minima over sum of maxima) of the soft mask with each of SHAPES' templates."""
    if area <= 0:
        return np.zeros(len(SHAPES))
    scores = []
    for shape in SHAPES:
        template = _template(shape, area, centroid, soft.shape)
        scores.append(np.minimum(soft, template).sum() / np.maximum(soft, template).sum())
    return np.array(scores)


def _classify_motion(displacement: np.ndarray, frames: int, config: WorldConfig) -> tuple[str, str]:
    """Direction from the dominant axis of the centroid displacement; speed from its size per frame."""
    drow, dcol = displacement
    if max(abs(drow), abs(dcol)) < MIN_DISPLACEMENT or frames < 1:
        return "none", "none"
    if abs(dcol) >= abs(drow):
        direction = "right" if dcol > 0 else "left"
    else:
        direction = "down" if drow > 0 else "up"
    per_frame = max(abs(drow), abs(dcol)) / frames
    speed = "fast" if per_frame > (config.slow_speed + config.fast_speed) / 2 else "slow"
    return direction, speed


def _stabilities(areas: np.ndarray, colours: np.ndarray, centroids: np.ndarray) -> tuple[float, float, float]:
    """Temporal consistency parts, each 1.0 when perfectly stable and falling to 0.

    area: 1 - coefficient of variation of the area (absent frames count as area 0);
    colour: 1 - mean distance of each frame's mean colour from the clip's, relative to half the distance
    of the closest two palette colours (a drift that far would change the colour's name);
    motion: 1 - mean |second difference| of the centroid relative to (mean |first difference| + 1 px), so
    steady motion scores 1 whatever its speed, and jumps back and forth score near 0.
    """
    area = 1.0 - min(1.0, float(areas.std() / max(areas.mean(), 1e-6)))
    present = ~np.isnan(colours[:, 0])
    drift = np.linalg.norm(colours[present] - colours[present].mean(0), axis=1).mean() if present.any() else 1.0
    colour = 1.0 - min(1.0, float(drift) / COLOUR_DRIFT_SCALE)
    path = centroids[~np.isnan(centroids[:, 0])]
    if len(path) < 3:
        return area, colour, 1.0 if len(path) == len(centroids) else 0.0
    speed = np.linalg.norm(np.diff(path, axis=0), axis=1).mean()
    jerk = np.linalg.norm(np.diff(path, n=2, axis=0), axis=1).mean()
    motion = 1.0 - min(1.0, float(jerk / (speed + 1.0)))
    return area, colour, motion


def _track_colour(clip: np.ndarray, k: int, unmixed: list, config: WorldConfig) -> DetectedObject | None:
    """Follow colour k through the clip; None when it is not a real object (too small or too rare)."""
    per_frame = [_measure_frame(frame, k, *parts) for frame, parts in zip(clip, unmixed)]
    present = np.array([m.core_pixels >= MIN_AREA_FRACTION * config.object_size**2 for m in per_frame])
    if present.mean() < MIN_PRESENCE:
        return None
    areas = np.array([m.area if p else 0.0 for m, p in zip(per_frame, present)])
    centroids = np.array([m.centroid if p else (np.nan, np.nan) for m, p in zip(per_frame, present)])
    colours = np.array([m.colour if p else np.full(3, np.nan) for m, p in zip(per_frame, present)])
    shape_scores = np.median([m.shape_scores for m, p in zip(per_frame, present) if p], axis=0)
    first, last = np.flatnonzero(present)[[0, -1]]
    displacement = centroids[last] - centroids[first]
    direction, speed = _classify_motion(displacement, int(last - first), config)
    area_stability, colour_stability, motion_smoothness = _stabilities(areas, colours, centroids)
    return DetectedObject(
        colour=COLOURS[k],
        shape=SHAPES[int(shape_scores.argmax())],
        direction=direction,
        speed=speed,
        shape_scores=tuple(float(x) for x in shape_scores),
        displacement=(float(displacement[0]), float(displacement[1])),
        areas=tuple(float(a) for a in areas),
        presence=float(present.mean()),
        area_stability=area_stability,
        colour_stability=colour_stability,
        motion_smoothness=motion_smoothness,
    )


def detect_objects(clip: np.ndarray, config: WorldConfig | None = None) -> list[DetectedObject]:
    """Recover the objects of a clip (frames, H, W, 3) in [0, 1] from pixels alone, largest first.

    Foreground pixels are grouped by nearest palette colour; in each frame the largest connected piece
    of each colour is that colour's object. A colour counts as an object only when its core is big
    enough in enough frames, so a generator's stray speckles do not add objects.
    """
    config = config or WorldConfig()
    clip = interior(np.asarray(clip, np.float32), config)
    background = np.asarray(config.background, np.float64)
    unmixed = list(zip(*_unmix(clip, background)))  # per frame: (label, alpha, residual)
    found = [obj for k in range(len(COLOURS)) if (obj := _track_colour(clip, k, unmixed, config)) is not None]
    return sorted(found, key=lambda o: -float(np.mean(o.areas)))


# ----------------------------------------------------------------------------------------------------
# Grader: scores
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipScore:
    """The grade of one clip against its prompt. Booleans are per clip; `grade_clips` averages them.

    adherence is the joint score: True only when the right number of objects is on screen and each has
    its prompt's colour, shape and direction (detected objects are matched to the prompt's in whichever
    order gets the most right). Speed is graded (speed_ok) but not part of it: slow and fast differ by
    one pixel per frame, which says more about the sampler's jitter than about following the prompt.
    sharpness is the clip's spatial edge energy over that of ground-truth renders of the same prompt:
    about 1 when sharp, below 1 when blurred, above 1 with added noise or speckles.
    temporal is the mean of the three stabilities (1.0 = perfectly stable), averaged over objects.
    """

    count_ok: bool
    colour_ok: bool
    shape_ok: bool
    direction_ok: bool
    speed_ok: bool
    adherence: bool
    sharpness: float
    temporal: float
    area_stability: float
    colour_stability: float
    motion_smoothness: float
    objects: tuple[DetectedObject, ...]


_ATTRIBUTES = ("colour", "shape", "direction", "speed")


def _wanted(scene: Scene) -> list[tuple[str, str, str, str]]:
    """Per prompt object, the value each of `_ATTRIBUTES` must take."""
    return [(o.colour, o.shape, o.direction, scene.speed) for o in scene.objects]


def _match(scene: Scene, found: list[DetectedObject]) -> list[DetectedObject | None]:
    """For each prompt object, its detected object (None if missing), so that two objects are graded
    whatever order the prompt names them in. Colour identifies an object first (both sides have
    distinct colours); among equally good colour matchings, the one with most attributes right wins,
    which pairs a single wrongly coloured object with the prompt's object rather than with nothing."""
    wanted = _wanted(scene)
    padded = found + [None] * max(0, len(wanted) - len(found))

    def hits(assignment: tuple[DetectedObject | None, ...]) -> tuple[int, int]:
        right = [
            [d is not None and getattr(d, name) == value for name, value in zip(_ATTRIBUTES, want)]
            for want, d in zip(wanted, assignment)
        ]
        return sum(r[0] for r in right), sum(map(sum, right))

    return list(max(itertools.permutations(padded, len(wanted)), key=hits))


def _foreground(clip: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel (label, alpha of the label's colour, residual, foreground mask) for a whole clip."""
    label, alpha, residual = _unmix(clip, background)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    return label, best_alpha, residual, (best_alpha >= FOREGROUND_ALPHA) & (residual <= MAX_RESIDUAL)


def edge_energy(clip: np.ndarray, config: WorldConfig | None = None) -> float:
    """Mean over frames of the summed squared spatial gradient (forward differences, all channels), with
    the background's noise subtracted.

    A blur spreads each edge over more pixels with a smaller step, so the squared sum falls roughly as
    1/width; totals (not pixelwise differences) make it independent of where the objects are. Pixel
    noise adds gradient energy everywhere; its mean per pixel, measured away from the objects (beyond 3
    pixels of any foreground), is taken off the pixels near the objects, and the far ones are dropped,
    so a generator's faint noise does not read as extra sharpness.
    """
    config = config or WorldConfig()
    clip = interior(np.asarray(clip, np.float64), config)
    per_pixel = np.zeros(clip.shape[:3])
    per_pixel[:, :-1, :] += (np.diff(clip, axis=1) ** 2).sum(-1)
    per_pixel[:, :, :-1] += (np.diff(clip, axis=2) ** 2).sum(-1)
    *_, foreground = _foreground(clip, np.asarray(config.background, np.float64))
    near = ndimage.binary_dilation(foreground, structure=np.ones((1, 7, 7)))
    noise = per_pixel[~near].mean() if (~near).any() else 0.0
    energy = (per_pixel * near).sum(axis=(1, 2)).mean() - noise * near.sum(axis=(1, 2)).mean()
    return max(float(energy), 0.0)


_REFERENCE_ENERGY: dict[tuple, float] = {}


def reference_energy(prompt_or_scene: str | Scene, config: WorldConfig | None = None) -> float:
    """Edge energy of ground truth for a prompt: the mean over a few seeds' renders (cached)."""
    config = config or WorldConfig()
    prompt = format_prompt(as_scene(prompt_or_scene))
    key = (prompt, dataclasses.astuple(config))
    if key not in _REFERENCE_ENERGY:
        energies = [edge_energy(render(prompt, seed, config), config) for seed in range(SHARPNESS_REFERENCE_SEEDS)]
        _REFERENCE_ENERGY[key] = float(np.mean(energies))
    return _REFERENCE_ENERGY[key]


def grade_clip(clip: np.ndarray, prompt: str | Scene, config: WorldConfig | None = None) -> ClipScore:
    """Grade one clip (frames, H, W, 3) in [0, 1] against the prompt it was generated for."""
    config = config or WorldConfig()
    if np.shape(clip)[1:] != (config.height, config.width, 3):
        raise ValueError(f"clip shape {np.shape(clip)} is not (frames, {config.height}, {config.width}, 3)")
    scene = as_scene(prompt)
    found = detect_objects(clip, config)
    matched = _match(scene, found)
    ok = {
        name: all(d is not None and getattr(d, name) == want[i] for d, want in zip(matched, _wanted(scene)))
        for i, name in enumerate(_ATTRIBUTES)
    }
    count_ok = len(found) == len(scene.objects)
    parts = np.array([[o.area_stability, o.colour_stability, o.motion_smoothness] for o in found]).reshape(-1, 3)
    stabilities = parts.mean(0) if len(found) else np.zeros(3)
    return ClipScore(
        count_ok=count_ok,
        colour_ok=ok["colour"],
        shape_ok=ok["shape"],
        direction_ok=ok["direction"],
        speed_ok=ok["speed"],
        adherence=count_ok and ok["colour"] and ok["shape"] and ok["direction"],
        sharpness=edge_energy(clip, config) / reference_energy(scene, config),
        temporal=float(stabilities.mean()),
        area_stability=float(stabilities[0]),
        colour_stability=float(stabilities[1]),
        motion_smoothness=float(stabilities[2]),
        objects=tuple(found),
    )


# ----------------------------------------------------------------------------------------------------
# Distribution distance on simple features
# ----------------------------------------------------------------------------------------------------


def _trajectory_features(weights: np.ndarray) -> np.ndarray:
    """Mean position and displacement (rows, cols; in frame units), mean step and mean jerk (px) of the
    coverage-weighted centroid of all foreground, frame by frame."""
    mass = weights.sum(axis=(1, 2))
    rows, cols = np.indices(weights.shape[1:])
    keep = mass > 1e-6
    if keep.sum() < 3:
        return np.zeros(6)
    path = np.stack([(weights * rows).sum((1, 2)), (weights * cols).sum((1, 2))], 1)[keep] / mass[keep, None]
    size = np.array(weights.shape[1:])
    step = np.linalg.norm(np.diff(path, axis=0), axis=1).mean()
    jerk = np.linalg.norm(np.diff(path, n=2, axis=0), axis=1).mean()
    return np.array([*(path.mean(0) / size), *((path[-1] - path[0]) / size), step, jerk])


def clip_features(clip: np.ndarray, config: WorldConfig | None = None) -> np.ndarray:
    """A 23-number summary of a clip for Fréchet distances (entries of order 1; areas in objects):

    [0:4] area of each palette colour; [4] area of off-palette pixels (neither background nor a palette
    blend); [5:8], [8:11] mean and spread of foreground RGB; [11:13] foreground area per frame, mean and
    spread; [13:19] centroid mean position and displacement (frame units), mean step and jerk (px);
    [19] fill ratio; [20] log edge energy; [21] background noise (RMS x 10); [22] mean foreground alpha.
    """
    config = config or WorldConfig()
    clip = interior(np.asarray(clip, np.float32), config)
    background = np.asarray(config.background, np.float64)
    object_area = config.object_size**2
    label, best_alpha, residual, foreground = _foreground(clip, background)
    off_palette = (np.linalg.norm(clip - background, axis=-1) >= OFF_PALETTE_DISTANCE) & ~foreground
    quiet = ~foreground & ~off_palette
    pixels = clip[foreground] if foreground.any() else np.broadcast_to(background, (1, 3))
    areas = foreground.sum(axis=(1, 2)) / object_area
    soft = best_alpha * foreground
    colour_areas = [(foreground & (label == k)).sum() / (len(clip) * object_area) for k in range(len(COLOURS))]
    return np.array(
        [
            *colour_areas,
            off_palette.sum() / (len(clip) * object_area),
            *pixels.mean(0),
            *pixels.std(0),
            areas.mean(),
            areas.std(),
            *_trajectory_features(soft),
            np.median([_fill_ratio(s, m) for s, m in zip(soft, foreground)]),
            np.log1p(edge_energy(clip, config)),
            10 * np.sqrt(((clip - background)[quiet] ** 2).mean()) if quiet.any() else 10.0,
            best_alpha[foreground].mean() if foreground.any() else 0.0,
        ],
        dtype=np.float64,
    )


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as in FID:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is computed as the trace of the root of the symmetric S_a^1/2 S_b S_a^1/2 (the same
    eigenvalues) with scipy's `eigh`: unlike `sqrtm` of the non-symmetric product, it stays real and
    exact when covariances are singular (fewer clips than features, or a constant feature).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or a.shape[1:] != b.shape[1:] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    distance = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum()
    return float(max(distance, 0.0))  # rounding can leave identical sets a hair below zero


def grade_clips(
    clips: list[np.ndarray] | np.ndarray,
    prompts: list[str],
    config: WorldConfig | None = None,
    reference_seed: int = 1_000_000,
) -> dict[str, float]:
    """Grade many clips: the mean of every ClipScore number, plus `frechet`, the Fréchet distance of
    their features to ground truth rendered for the same prompts (seeds reference_seed + i)."""
    config = config or WorldConfig()
    if len(clips) != len(prompts):
        raise ValueError(f"got {len(clips)} clips but {len(prompts)} prompts")
    scores = [grade_clip(clip, prompt, config) for clip, prompt in zip(clips, prompts)]
    fields = [f.name for f in dataclasses.fields(ClipScore) if f.name != "objects"]
    result = {name: float(np.mean([getattr(s, name) for s in scores])) for name in fields}
    if len(clips) >= 2:
        truth = [render(p, reference_seed + i, config) for i, p in enumerate(prompts)]
        result["frechet"] = frechet_distance(
            np.stack([clip_features(c, config) for c in clips]), np.stack([clip_features(c, config) for c in truth])
        )
    return result
