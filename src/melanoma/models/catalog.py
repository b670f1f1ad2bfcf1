"""Names the command line offers before anything is loaded: the course notebook's seed CNNs with their layer specs,
and the out-of-distribution gate's detectors. Torch- and numpy-free, so that the config and ``melanoma --help`` read
them at once."""
from __future__ import annotations

SEED_MODELS: dict[str, dict] = {
    # the notebook's first model (overfits): three conv blocks, no dropout
    "seed-cnn": {"channels": (32, 64, 128), "dropout": 0.0},
    # the notebook's augmented model: wider conv blocks, Dropout(0.2) before Flatten
    "seed-cnn-aug": {"channels": (64, 128, 256), "dropout": 0.2},
    # the notebook's rebalanced (Augmentor) model
    "seed-cnn-dropout": {"channels": (32, 64, 128), "dropout": 0.2},
}

# the out-of-distribution gate's detectors (melanoma.models.ood)
DETECTORS = ("mahalanobis", "energy", "knn")
DEFAULT_DETECTOR = "knn"  # rejected every far set and 99 % of clinical photos on the main job (docs/ood.md)
