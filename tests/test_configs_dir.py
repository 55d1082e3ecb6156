"""Every shipped experiment config loads and validates."""

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem
    assert cfg.model.num_latent_frames % cfg.model.frames_per_block == 0


def test_there_are_configs():
    assert {"wan_1_3b_framewise.yaml", "wan_1_3b_chunkwise.yaml"} <= {p.name for p in CONFIGS}


def test_local_paths_in_toy_configs_exist():
    """The toy configs run from a fresh clone: every local input they name is in the repository."""
    root = Path(__file__).parent.parent
    cfg = load_config(str(root / "configs" / "toy_preprocess.yaml"))
    inputs = [cfg.model.teacher_path, cfg.model.text_encoder_path, cfg.model.codec, cfg.data.prompts]
    assert all((root / path).exists() for path in inputs), [p for p in inputs if not (root / p).exists()]
