"""The names of the course notebook's seed CNNs and their layer specs, torch-free so that the config (and
``melanoma --help``) can read them without importing torch."""
from __future__ import annotations

SEED_MODELS: dict[str, dict] = {
    # the notebook's first model (overfits): three conv blocks, no dropout
    "seed-cnn": {"channels": (32, 64, 128), "dropout": 0.0},
    # the notebook's augmented model: wider conv blocks, Dropout(0.2) before Flatten
    "seed-cnn-aug": {"channels": (64, 128, 256), "dropout": 0.2},
    # the notebook's rebalanced (Augmentor) model
    "seed-cnn-dropout": {"channels": (32, 64, 128), "dropout": 0.2},
}
