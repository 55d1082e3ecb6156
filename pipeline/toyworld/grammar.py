"""The toy world's prompt grammar: colours, shapes, directions and speeds, parsing and listing prompts.

One or two objects, one speed for the whole scene:

    a red square moving left, fast
    a red square moving left and a blue circle moving up, slow

A colour's name and its RGB value (PALETTE) belong together here: the renderer paints with them and the
grader names what it sees with them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Palette colours sit far apart in RGB and far from the default background, so that a pixel's colour is
# recoverable even when it is an anti-aliased blend with the background (see `_unmix`).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SPEEDS: tuple[str, ...] = ("slow", "fast")

@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: what it looks like and where it goes."""

    colour: str
    shape: str
    direction: str


@dataclass(frozen=True)
class Scene:
    """A parsed prompt: one or more objects with distinct colours, moving at one shared speed."""

    objects: tuple[ObjectSpec, ...]
    speed: str


def _expect(word: str, allowed: tuple[str, ...], role: str, text: str) -> str:
    if word not in allowed:
        raise ValueError(f"unknown {role} {word!r} in prompt {text!r} (expected one of: {', '.join(allowed)})")
    return word


def _parse_object(chunk: str, text: str) -> ObjectSpec:
    words = chunk.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(
            f"cannot parse object {chunk!r} in prompt {text!r}: expected 'a <colour> <shape> moving <direction>'"
        )
    return ObjectSpec(
        colour=_expect(words[1], COLOURS, "colour", text),
        shape=_expect(words[2], SHAPES, "shape", text),
        direction=_expect(words[4], DIRECTIONS, "direction", text),
    )


def parse_prompt(text: str) -> Scene:
    """Parse a prompt of the toy grammar; raise ValueError naming the offending word on bad input.

    Case, surrounding whitespace and a trailing full stop are forgiven; the speed is required, because a
    silent default would make the grader check something the prompt never said.
    """
    clean = " ".join(text.lower().strip().rstrip(".").split())
    body, comma, speed = clean.rpartition(",")
    if not comma:
        raise ValueError(f"prompt {text!r} has no speed: end it with ', slow' or ', fast'")
    speed = _expect(speed.strip(), SPEEDS, "speed", text)
    objects = tuple(_parse_object(chunk.strip(), text) for chunk in body.split(" and "))
    colours = [obj.colour for obj in objects]
    if len(set(colours)) != len(colours):
        raise ValueError(f"prompt {text!r} repeats a colour: objects must have distinct colours")
    return Scene(objects=objects, speed=speed)


def format_prompt(scene: Scene) -> str:
    """Inverse of `parse_prompt`: the canonical text of a scene."""
    body = " and ".join(f"a {o.colour} {o.shape} moving {o.direction}" for o in scene.objects)
    return f"{body}, {scene.speed}"


def as_scene(prompt_or_scene: str | Scene) -> Scene:
    """A prompt parsed, or a scene as it is."""
    return parse_prompt(prompt_or_scene) if isinstance(prompt_or_scene, str) else prompt_or_scene


def all_prompts(max_objects: int = 1) -> list[str]:
    """Every prompt with 1..max_objects objects, in a fixed order.

    Two-object prompts list their colours in palette order, so no scene appears twice.
    """
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    looks = list(itertools.product(SHAPES, DIRECTIONS))
    prompts = []
    for count in range(1, max_objects + 1):
        for colours in itertools.combinations(COLOURS, count):
            for parts in itertools.product(looks, repeat=count):
                for speed in SPEEDS:
                    objects = tuple(ObjectSpec(c, s, d) for c, (s, d) in zip(colours, parts))
                    prompts.append(format_prompt(Scene(objects, speed)))
    return prompts


def sample_prompt(rng: np.random.Generator, max_objects: int = 1) -> str:
    """A random prompt: the object count is uniform in 1..max_objects, then every word uniform."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    count = int(rng.integers(1, max_objects + 1))
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    objects = tuple(
        ObjectSpec(COLOURS[c], SHAPES[rng.integers(len(SHAPES))], DIRECTIONS[rng.integers(len(DIRECTIONS))])
        for c in colours
    )
    return format_prompt(Scene(objects, SPEEDS[rng.integers(len(SPEEDS))]))


def vocabulary() -> list[str]:
    """Every word (and punctuation token) the grammar produces, for a word-level tokenizer."""
    return ["a", *COLOURS, *SHAPES, "moving", *DIRECTIONS, "and", ",", *SPEEDS]
