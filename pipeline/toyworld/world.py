"""The toy world's geometry, read by both the renderer (what to draw) and the grader (where to look)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The grader counts a pixel as an object's when it is at least half-way from the background to a
# palette colour. The config refuses trails that would reach it.
FOREGROUND_ALPHA = 0.5


@dataclass
class WorldConfig:
    """Geometry and timing of the toy world. Positions, sizes and speeds are whole pixels, so a clip of
    a given prompt is the same picture translated, whatever the seed: the sharpness reference is exact."""

    frames: int = 9  # 1 + 4k, like Wan clips, so the Wan VAE accepts toy clips too
    height: int = 32
    width: int = 32
    object_size: int = 10  # side of the object's bounding box, pixels
    size_jitter: int = 0  # size drawn uniformly from object_size +- size_jitter (changes edge energy)
    slow_speed: int = 1  # pixels per frame
    fast_speed: int = 2
    background: tuple[float, float, float] = (0.1, 0.1, 0.1)
    max_objects: int = 2
    min_gap: int = 2  # pixels kept between two objects' boxes in every frame, so they never touch
    margin: int = 1  # pixels kept between a box and the frame border, so every edge is in the picture
    supersample: int = 4  # anti-aliasing: render at 4x then box-downsample
    # A fading motion trail behind each object, `trail_frames` frames of travel long, starting at
    # `trail_alpha` and fading linearly. It makes the direction visible in a single frame (as motion
    # blur does in real video): without it a position-blind DiT (Wan has no absolute position signal)
    # must decide the direction from text alone by coordinating whole frames, which the toy teacher
    # failed to learn (bench/RESULTS.md). The trail stays below FOREGROUND_ALPHA, so the grader never
    # counts it as part of the object. 0 disables it.
    trail_frames: int = 4
    trail_alpha: float = 0.45
    # A grey frame `border` pixels wide around every frame, brightening from `border_first` at the first
    # frame to `border_last` at the last: a clock and a ruler. Wan's attention only sees relative
    # positions (RoPE), so without it a DiT cannot tell where a frame's edge is or which frame comes
    # first, and "moving left" (which fixes where the object is in each frame) cannot be tied to the
    # text (bench/RESULTS.md). The grader looks only inside the border. 0 (the default) disables it;
    # the toy teacher's config turns it on.
    border: int = 0
    border_first: float = 0.3
    border_last: float = 0.6
    # Objects enter from the edge they move away from ("moving right" starts at the left margin), so a
    # prompt fixes where its object is in every frame along the motion (only the other axis is random).
    start_at_edge: bool = False

    def __post_init__(self) -> None:
        travel = self.fast_speed * (self.frames - 1) + self.object_size + self.size_jitter + 2 * (self.margin + self.border)
        if travel > min(self.height, self.width):
            raise ValueError(
                f"a fast object needs {travel} px to stay in frame but the frame is {self.height}x{self.width}: "
                "lower frames, fast_speed or object_size"
            )
        if not 0 < self.slow_speed < self.fast_speed:
            raise ValueError(f"need 0 < slow_speed < fast_speed, got {self.slow_speed}, {self.fast_speed}")
        if not 1 <= self.max_objects <= 2:
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        if self.trail_frames < 0 or not 0.0 <= self.trail_alpha < FOREGROUND_ALPHA:
            raise ValueError(
                f"need trail_frames >= 0 and 0 <= trail_alpha < {FOREGROUND_ALPHA} (the grader's foreground "
                f"threshold), got {self.trail_frames}, {self.trail_alpha}"
            )

    def speed_pixels(self, speed: str) -> int:
        return {"slow": self.slow_speed, "fast": self.fast_speed}[speed]


def interior(clip: np.ndarray, config: WorldConfig) -> np.ndarray:
    """The part of a clip (frames, H, W, 3) inside the border: all the grader looks at."""
    b = config.border
    return clip[:, b : clip.shape[1] - b, b : clip.shape[2] - b] if b else clip
