"""Turned copies of a Test image in Train (flipped, turned by 90 degrees, rotated by 10 degrees and cropped as
Augmentor crops) are near copies; different pictures, mirrored or not, are not."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import lesion_image, save_image
from PIL import Image

from melanoma.audit.audit import AuditConfig, run_audit
from melanoma.audit.copies import fingerprint, near_copy_pairs
from melanoma.audit.manifest import ACTION_DROP_TRAIN_COPY
from melanoma.data.records import ImageRecord
from melanoma.data.sources import discover_folder


def _rotate_and_crop(pixels: np.ndarray, angle: float) -> np.ndarray:
    """Rotate, crop the largest inner square and resize back (Augmentor's rotate, as balance.augmentor_rotate)."""
    side = pixels.shape[0]
    rotated = Image.fromarray(pixels).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    crop = side / (np.cos(np.deg2rad(abs(angle))) + np.sin(np.deg2rad(abs(angle))))
    left, top = (rotated.width - crop) / 2, (rotated.height - crop) / 2
    box = tuple(int(round(v)) for v in (left, top, left + crop, top + crop))
    return np.asarray(rotated.crop(box).resize((side, side), Image.Resampling.BICUBIC))


TURNS = {
    "flipped left-right": lambda p: p[:, ::-1],
    "flipped top-bottom": lambda p: p[::-1],
    "turned 90 degrees": lambda p: np.rot90(p),
    "transposed": lambda p: p.transpose(1, 0, 2),
    "rotated 10 degrees and cropped": lambda p: _rotate_and_crop(p, 10),
    "rotated -7 degrees and cropped": lambda p: _rotate_and_crop(p, -7),
    "flipped, rotated 4 degrees and cropped": lambda p: _rotate_and_crop(p[:, ::-1], 4),
}


def _flagged(images: list[np.ndarray], tmp_path) -> dict[tuple[int, int], float]:
    prints = []
    for position, pixels in enumerate(images):
        path = save_image(tmp_path / f"{position}.png", np.ascontiguousarray(pixels))
        prints.append(fingerprint(ImageRecord(path=path, rel_path=path.name, label="x")))
    return {(i, j): d for i, j, d in near_copy_pairs(prints, AuditConfig().near_threshold)}


@pytest.mark.parametrize("seed", range(2))
def test_turned_copies_are_near_copies(tmp_path, seed):
    original = lesion_image(seed, size=128)
    flagged = _flagged([original] + [turn(original) for turn in TURNS.values()], tmp_path)
    missed = [name for position, name in enumerate(TURNS, start=1) if (0, position) not in flagged]
    assert missed == []


def test_different_pictures_and_their_mirror_images_are_not_copies(tmp_path):
    images = [lesion_image(seed, 128) for seed in range(8)]
    mirrored = [np.rot90(images[1]), images[2][:, ::-1], _rotate_and_crop(images[3], 10)]
    flagged = _flagged(images + mirrored, tmp_path)
    # the mirrored pictures are copies of their own originals (1, 2, 3) and of nothing else
    assert set(flagged) == {(1, 8), (2, 9), (3, 10)}


def test_the_audit_drops_turned_train_copies_of_a_test_image(tmp_path):
    test_image = lesion_image(11, 128)
    root = tmp_path / "data"
    save_image(root / "Test/melanoma/ISIC_0000100.png", test_image)
    for name, turn in zip(("flip", "rot90", "rot10"), (TURNS["flipped left-right"], TURNS["turned 90 degrees"],
                                                      TURNS["rotated 10 degrees and cropped"])):
        save_image(root / f"Train/melanoma/{name}.png", np.ascontiguousarray(turn(test_image)))
    for seed in range(3):
        other = lesion_image(20 + seed, 128)
        save_image(root / f"Train/nevus/other{seed}.png", other)
        save_image(root / f"Train/nevus/other{seed}_mirror.png", np.ascontiguousarray(other[::-1]))
    result = run_audit(discover_folder(root), None, AuditConfig(workers=2))
    actions = {row["path"]: row["action"] for row in result.manifest}
    for name in ("flip", "rot90", "rot10"):
        assert actions[f"Train/melanoma/{name}.png"] == ACTION_DROP_TRAIN_COPY, name
    assert all(actions[f"Train/nevus/other{seed}.png"] != ACTION_DROP_TRAIN_COPY for seed in range(3))
