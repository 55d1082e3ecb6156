"""The toy teacher shipped in the package: it loads like a Wan checkout and follows prompts."""

from pathlib import Path

import numpy as np
import torch

from pipeline import toyworld
from pipeline.config import load_config
from pipeline.generation import ClipGenerator, TeacherClipGenerator
from pipeline.pretrain import SHIPPED_TEACHER, ToyBundle, sample_clips


def test_shipped_teacher_follows_prompts():
    bundle = ToyBundle.load(SHIPPED_TEACHER)
    prompts = toyworld.all_prompts(bundle.world.max_objects)
    chosen = [prompts[i] for i in np.random.default_rng(2026).permutation(len(prompts))[:8]]
    clips = sample_clips(bundle, chosen, seed=99)  # with the sampler settings the bundle records
    grades = [toyworld.grade_clip(clip, prompt, bundle.world) for clip, prompt in zip(clips, chosen)]
    misses = [(p, g.objects) for p, g in zip(chosen, grades) if not g.adherence]
    assert len(misses) <= 1, misses


def test_teacher_clip_generator_starts_from_the_students_noise_and_follows_prompts():
    """The quickstart's comparison: the teacher's clip of (prompt, seed) starts from the noise the
    one-step student's clip of (prompt, seed) starts from, and it is a clip of that prompt."""
    teacher = TeacherClipGenerator(str(SHIPPED_TEACHER), "")
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "toy_distill.yaml"))  # the student's geometry; the teacher's weights stand in
    student = ClipGenerator.load(str(SHIPPED_TEACHER), cfg)
    prompt = "a red square moving left, fast"
    assert torch.equal(teacher.noise(prompt, 7), student.noise(prompt, 7))
    assert not torch.equal(teacher.noise(prompt, 7), teacher.noise(prompt, 8))
    clip, timing = teacher.timed(prompt, 7)
    assert clip.shape == (teacher.bundle.world.frames, teacher.bundle.world.height, teacher.bundle.world.width, 3)
    assert timing.frames == len(clip) and timing.first_frame_seconds == timing.seconds > 0
    assert toyworld.grade_clip(clip, prompt, teacher.bundle.world).adherence
