"""Shared fixtures: tiny random checkpoints of the four real architectures, saved and
reloaded through the same ``from_pretrained`` path users take."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

from egg_eval.backbones import BACKBONES, load_backbone
from egg_eval.backbones.tiny import FAMILIES, save_tiny

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: str(save_tiny(fam, root / fam)) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_backbones(tiny_paths):
    return {fam: load_backbone(fam, tiny_paths[fam], device="cpu", max_new_tokens=4) for fam in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


assert set(BACKBONES) == set(FAMILIES)


def interrupt_after(monkeypatch, n: int) -> None:
    """Make the next run stop as Ctrl-C would after ``n`` samples recorded (the runner's next
    sample raises KeyboardInterrupt): the way to leave a run folder half done."""
    import egg_eval.runner as R

    real, calls = R._one, []

    def one(*args, **kw):
        if len(calls) == n:
            monkeypatch.setattr(R, "_one", real)
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(R, "_one", one)
