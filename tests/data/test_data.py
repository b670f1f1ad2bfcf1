"""Data layer: discovery, manifests, safe decoding of every kind of bad image, and the in-memory cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SHARED_DATA, lesion_image, requires_shared_data, save_image
from PIL import Image

from melanoma.core.errors import DataError, ImageDecodeError
from melanoma.data.images import build_cache, decode_image
from melanoma.data.records import image_id_from_name
from melanoma.data.sources import discover_folder, load_dataset, read_manifest


def test_split_layout_sorted_classes_and_ids(make_tree):
    root = make_tree({("Train", "nevus"): [("ISIC_0000001.jpg", lesion_image(1))],
                      ("Train", "melanoma"): [("ISIC_0000002(1).jpg", lesion_image(2))],
                      ("Test", "melanoma"): [("ISIC_0000003.jpg", lesion_image(3))]})
    index = discover_folder(root)
    assert index.classes == ["melanoma", "nevus"]
    assert index.splits == ["Test", "Train"]
    by_name = {r.rel_path: r for r in index.records}
    assert by_name["Train/melanoma/ISIC_0000002(1).jpg"].image_id == "ISIC_0000002"
    assert by_name["Test/melanoma/ISIC_0000003.jpg"].is_test
    assert index.warnings == []


def test_flat_layout_has_no_split(make_tree):
    root = make_tree({("", "nevus"): [("x.jpg", lesion_image(1))], ("", "melanoma"): [("y.jpg", lesion_image(2))]})
    index = load_dataset(root)
    assert index.classes == ["melanoma", "nevus"]
    assert {r.split for r in index.records} == {""}


def test_empty_class_one_class_and_test_only_class_are_warned(make_tree, tmp_path):
    root = make_tree({("Train", "nevus"): [("a.jpg", lesion_image(1))],
                      ("Test", "nevus"): [("b.jpg", lesion_image(2))],
                      ("Test", "melanoma"): [("c.jpg", lesion_image(3))]})
    (root / "Train" / "dermatofibroma").mkdir()
    warnings = "\n".join(discover_folder(root).warnings)
    assert "dermatofibroma" in warnings and "holds no images" in warnings
    assert "'melanoma' has images in Test but none in Train" in warnings

    single = make_tree({("", "nevus"): [("a.jpg", lesion_image(1))]}, root=tmp_path / "single")
    assert any("only one class" in w for w in discover_folder(single).warnings)


def test_missing_or_empty_data_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "hollow" / "nevus").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_dataset(tmp_path / "hollow")


def test_non_image_suffix_is_skipped_and_listed(make_tree):
    root = make_tree({("", "nevus"): [("a.jpg", lesion_image(1))], ("", "melanoma"): [("b.jpg", lesion_image(2))]})
    (root / "nevus" / "notes.txt").write_text("hello")
    index = discover_folder(root)
    assert [s["file"] for s in index.skipped] == ["nevus/notes.txt"]


def test_non_utf8_file_name_is_named_and_still_loaded(make_tree):
    root = make_tree({("", "nevus"): [("a.jpg", lesion_image(1))], ("", "melanoma"): [("b.jpg", lesion_image(2))]})
    bad = os.path.join(os.fsencode(root / "nevus"), b"ISIC_\xff.jpg")
    with open(bad, "wb") as handle:
        handle.write((root / "nevus" / "a.jpg").read_bytes())
    index = discover_folder(root)
    assert any("ISIC_\\xff.jpg" in w and "not valid UTF-8" in w for w in index.warnings)
    assert len(index.records) == 3


# --- manifests ------------------------------------------------------------------------------------------------


def _manifest(tmp_path, text: str):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_manifest_by_path_and_isic_id(tmp_path):
    save_image(tmp_path / "imgs" / "ISIC_0000001.jpg", lesion_image(1))
    save_image(tmp_path / "ISIC_0000002.jpg", lesion_image(2))
    path = _manifest(tmp_path, "image,label,lesion_id\nimgs/ISIC_0000001.jpg,melanoma,HAM_1\nISIC_0000002,nevus,\n")
    index = read_manifest(path)
    assert [(r.image_id, r.label, r.lesion_id) for r in index.records] == [
        ("ISIC_0000001", "melanoma", "HAM_1"), ("ISIC_0000002", "nevus", None)]
    assert index.classes == ["melanoma", "nevus"]


@pytest.mark.parametrize("body, message", [
    ("image,label\nISIC_0000001,melanomma\n", "row 2 (ISIC_0000001): unknown label 'melanomma'"),
    ("image,label\nmissing.jpg,melanoma\n", "row 2 (missing.jpg): file not found"),
    ("path,label\nISIC_0000001,melanoma\n", "missing column 'image' (has: label, path)"),
    ("image,label\n", "a header but no rows"),
    ("", "empty file"),
    ("image,label\n,melanoma\n", "row 2: empty 'image'"),
    ("image,label\nimgs,melanoma\n", "row 2 (imgs): is a folder, not an image file"),
])
def test_bad_manifest_names_the_row(tmp_path, body, message):
    save_image(tmp_path / "ISIC_0000001.jpg", lesion_image(1))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError) as error:
        read_manifest(_manifest(tmp_path, body))
    assert message in str(error.value)
    assert "manifest.csv" in str(error.value)


# --- decoding bad images --------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty.jpg: empty file \(0 bytes\)"):
        decode_image(tmp_path / "empty.jpg")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "fake.jpg").write_text("this is not a JPEG")
    with pytest.raises(ImageDecodeError, match=r"fake.jpg: not an image"):
        decode_image(tmp_path / "fake.jpg")


def test_truncated_jpeg(tmp_path):
    path = save_image(tmp_path / "full.jpg", lesion_image(1, size=128))
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"cut.jpg: truncated or corrupt"):
        decode_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageDecodeError, match=r"bomb.png: .*(decompression bomb)"):
        decode_image(tmp_path / "bomb.png")


def test_png_with_alpha_is_flattened(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent
    path = save_image(tmp_path / "alpha.png", rgba)
    decoded = decode_image(path)
    assert decoded.pixels.shape == (8, 8, 3)
    assert decoded.pixels[0, 0].tolist() == [200, 0, 0]
    assert decoded.pixels[7, 7].tolist() == [0, 0, 0]
    assert any("alpha" in note for note in decoded.notes)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_other_modes_become_rgb(tmp_path, mode):
    image = Image.fromarray(lesion_image(1)).convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    decoded = decode_image(path)
    assert decoded.pixels.shape == (64, 64, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.original_mode == mode
    assert any("converted to RGB" in note for note in decoded.notes)


def test_16_bit_image_is_scaled_not_clipped(tmp_path):
    values = np.full((4, 4), 65535, dtype=np.uint16)
    values[0, 0] = 0
    Image.fromarray(values).save(tmp_path / "deep.png")
    decoded = decode_image(tmp_path / "deep.png")
    assert decoded.pixels[1, 1].tolist() == [255, 255, 255]
    assert decoded.pixels[0, 0].tolist() == [0, 0, 0]
    assert any("16-bit" in note for note in decoded.notes)


def test_exif_rotation_is_honoured(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white in the stored (landscape) orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded = decode_image(tmp_path / "rotated.jpg")
    assert decoded.pixels.shape == (40, 20, 3)
    assert decoded.pixels[2, 10].mean() > 200 and decoded.pixels[-3, 10].mean() < 50  # white moved to the top
    assert "EXIF orientation applied" in decoded.notes


def test_image_id_from_name():
    assert image_id_from_name("ISIC_0025509(1).jpg") == "ISIC_0025509"
    assert image_id_from_name("photo.png") == "photo"


# --- cache ----------------------------------------------------------------------------------------------------


def test_cache_decodes_once_resizes_and_records_errors(make_tree):
    root = make_tree({("", "nevus"): [(f"{i}.jpg", lesion_image(i)) for i in range(5)],
                      ("", "melanoma"): [("m.jpg", lesion_image(9))]})
    (root / "melanoma" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    index = discover_folder(root)
    cache = build_cache(index.records, size=32, workers=2)
    assert cache.images.shape == (7, 32, 32, 3) and cache.images.dtype == np.uint8
    assert cache.nbytes == 7 * 32 * 32 * 3
    broken = [i for i, r in enumerate(index.records) if r.rel_path.endswith("broken.jpg")]
    assert list(cache.errors) == broken and "broken.jpg" in cache.errors[broken[0]]
    assert len(cache.ok_indices) == 6
    assert cache.images[cache.ok_indices].reshape(6, -1).std(axis=1).min() > 1  # real pixels, not zeros


@requires_shared_data
def test_real_dataset_decodes_into_raw_sized_memory():
    # Load speed is measured by benchmarks/data_loading.py, not asserted here.
    index = discover_folder(SHARED_DATA)
    cache = build_cache(index.records, size=180)
    assert len(index.records) == 2359 and not cache.errors
    assert cache.nbytes == 2359 * 180 * 180 * 3


@pytest.mark.parametrize("name, block", [
    ("ISIC_0000000.jpg", "ISIC_0000000-0011999"), ("Train/melanoma/ISIC_0011999.jpg", "ISIC_0000000-0011999"),
    ("ISIC_0012000.jpg", "ISIC_0012000-0015999"), ("ISIC_0015999_downsampled.jpg", "ISIC_0012000-0015999"),
    ("ISIC_0016000.png", "ISIC_0016000-0024305"), ("ISIC_0024306.jpg", "ISIC_0024306-0034320"),
    ("ISIC_0034320.jpg", "ISIC_0024306-0034320"), ("ISIC_0034321.jpg", "ISIC_0034321 and later"),
    ("ISIC_9999999.jpg", "ISIC_0034321 and later"), ("clinic/lesion-7.jpg", "no ISIC id")])
def test_each_image_falls_in_one_block_of_isic_ids(name, block):
    from melanoma.data.records import COLLECTIONS, id_block

    assert id_block(name) == block and block in COLLECTIONS
