"""The toy world: coloured shapes moving on a plain background, and its exact grader.

Small enough to train a teacher on a laptop CPU, exact enough to grade: every prompt names what must be
on screen, and the grader recovers colour, shape, direction and speed from pixels alone (it never sees
the scene). DESIGN.md §5 explains its role; the package has no torch dependency.

    grammar.py    prompts: parse, format, list, sample; the palette
    world.py      WorldConfig: the geometry the renderer draws and the grader reads
    renderer.py   (prompt, seed) -> clip (frames, H, W, 3), float32 in [0, 1]
    grader.py     clip -> detected objects -> ClipScore; features and Fréchet distance over many clips

Everything public is re-exported here, so `from pipeline import toyworld; toyworld.render(...)` works.
"""

from pipeline.toyworld.grader import (
    ClipScore,
    DetectedObject,
    clip_features,
    detect_objects,
    edge_energy,
    frechet_distance,
    grade_clip,
    grade_clips,
    reference_energy,
)
from pipeline.toyworld.grammar import (
    COLOURS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SPEEDS,
    ObjectSpec,
    Scene,
    all_prompts,
    as_scene,
    format_prompt,
    parse_prompt,
    sample_prompt,
    vocabulary,
)
from pipeline.toyworld.renderer import render
from pipeline.toyworld.world import FOREGROUND_ALPHA, WorldConfig, interior

__all__ = [
    "COLOURS", "DIRECTIONS", "FOREGROUND_ALPHA", "PALETTE", "SHAPES", "SPEEDS", "ClipScore", "DetectedObject",
    "ObjectSpec", "Scene", "WorldConfig", "all_prompts", "as_scene", "clip_features", "detect_objects",
    "edge_energy", "format_prompt", "frechet_distance", "grade_clip", "grade_clips", "interior", "parse_prompt",
    "reference_energy", "render", "sample_prompt", "vocabulary",
]
