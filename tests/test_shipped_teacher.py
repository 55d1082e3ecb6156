"""The toy teacher shipped in the package: it loads like a Wan checkout and follows prompts."""

import numpy as np

from pipeline import toyworld
from pipeline.pretrain import SHIPPED_TEACHER, ToyBundle, sample_clips


def test_shipped_teacher_follows_prompts():
    bundle = ToyBundle.load(SHIPPED_TEACHER)
    prompts = toyworld.all_prompts(bundle.world.max_objects)
    chosen = [prompts[i] for i in np.random.default_rng(2026).permutation(len(prompts))[:8]]
    clips = sample_clips(bundle, chosen, seed=99)  # with the sampler settings the bundle records
    grades = [toyworld.grade_clip(clip, prompt, bundle.world) for clip, prompt in zip(clips, chosen)]
    misses = [(p, g.objects) for p, g in zip(chosen, grades) if not g.adherence]
    assert len(misses) <= 1, misses
