"""Shared test set-up: offline hubs, quiet progress bars, one thread per torch process."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
torch.set_num_threads(1)

TINY_WORDS = ("Tom", "has", "apples", "gives", "away", "How", "many", "left")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random policy + tokenizer saved as an HF checkpoint folder."""
    from dqo_ray.models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_WORDS, hidden_size=32,
                                layers=2, heads=4, seed=0)
