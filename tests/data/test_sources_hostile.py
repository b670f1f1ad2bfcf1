"""Data sources under hostile input (issue 23): class-folder names checked like manifest labels, audit and run
folders inside the data skipped, no pretend melanoma alert, lesion ids scoped by source, repeated header columns,
several files for one ISIC id, and clear one-line messages for broken CSV files and paths leading out of a folder."""
from __future__ import annotations

import csv
import os

import pytest
from conftest import lesion_image, save_image

from melanoma.audit.audit import run_audit
from melanoma.core.errors import DataError
from melanoma.data.sources import discover_folder, load_dataset, read_archive_download, read_manifest, source_summary
from melanoma.data.truth import load_ground_truth

ARCHIVE_HEADER = "isic_id,attribution,copyright_license,diagnosis_1,diagnosis_2,diagnosis_3,image_type,lesion_id\n"
MEL_ROW = "Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive"
NEVUS_ROW = "Benign,Benign melanocytic proliferations,Nevus"


def _one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- 4. class-folder names ----------------------------------------------------------------------------------


def test_usual_folder_spellings_map_onto_the_nine_classes_and_say_so(make_tree):
    root = make_tree({("Train", "Melanoma"): [("ISIC_0000001.jpg", lesion_image(1))],
                      ("Train", "NV"): [("ISIC_0000002.jpg", lesion_image(2))],
                      ("Train", "akiec"): [("ISIC_0000003.jpg", lesion_image(3))],
                      ("Train", "basal_cell_carcinoma"): [("ISIC_0000004.jpg", lesion_image(4))],
                      ("Test", "MEL"): [("ISIC_0000005.jpg", lesion_image(5))]})
    index = discover_folder(root)
    assert index.classes == ["actinic keratosis", "basal cell carcinoma", "melanoma", "nevus"]
    labels = {record.rel_path: record.label for record in index.records}
    assert labels["Test/MEL/ISIC_0000005.jpg"] == labels["Train/Melanoma/ISIC_0000001.jpg"] == "melanoma"
    mapped = [w for w in index.warnings if w.startswith("class folders read as")]
    assert len(mapped) == 1
    for said in ("'MEL' -> melanoma", "'Melanoma' -> melanoma", "'NV' -> nevus", "'akiec' -> actinic keratosis"):
        assert said in mapped[0]
    assert "MEL -> melanoma" in source_summary(index.sources[0])


def test_a_capitalised_folder_beside_a_manifest_is_one_class(make_tree, tmp_path):
    folder = make_tree({("", "Melanoma"): [("ISIC_0000001.jpg", lesion_image(1))],
                        ("", "nevus"): [("ISIC_0000002.jpg", lesion_image(2))]})
    save_image(tmp_path / "extra" / "ISIC_0000003.jpg", lesion_image(3))
    manifest = tmp_path / "extra" / "manifest.csv"
    manifest.write_text("image,label\nISIC_0000003.jpg,melanoma\n")
    assert load_dataset([folder, manifest]).classes == ["melanoma", "nevus"]


def test_an_unknown_folder_name_is_a_one_line_error_listing_the_accepted_names(make_tree):
    root = make_tree({("", "melanoma"): [("a.jpg", lesion_image(1))], ("", "cats"): [("b.jpg", lesion_image(2))],
                      ("", "UNK"): [("c.jpg", lesion_image(3))]})
    message = _one_line_error(load_dataset, root)
    assert "'UNK', 'cats'" in message and "not known" in message
    assert "seborrheic keratosis" in message and "MEL" in message and "AKIEC" in message


@pytest.mark.parametrize("marker", ["audit.json", "config.json", "clean_manifest.csv"])
def test_an_audit_or_run_folder_inside_the_data_is_skipped_not_a_class(make_tree, marker):
    root = make_tree({("Train", "melanoma"): [("a.jpg", lesion_image(1))],
                      ("Train", "nevus"): [("b.jpg", lesion_image(2))],
                      ("Test", "nevus"): [("c.jpg", lesion_image(3))]})
    save_image(root / "audit" / "leaks.png", lesion_image(4))          # an `audit --out` beside Train/Test
    (root / "audit" / marker).write_text("{}")
    save_image(root / "Train" / "run" / "curves.png", lesion_image(5))  # a run folder among the classes
    (root / "Train" / "run" / marker).write_text("{}")
    index = load_dataset(root)
    assert index.classes == ["melanoma", "nevus"] and index.splits == ["Test", "Train"]
    skipped = [w for w in index.warnings if "audit or run folder" in w]
    assert len(skipped) == 2 and all(marker in w for w in skipped)


def test_a_run_without_a_melanoma_class_says_so_and_never_shows_an_alert(tmp_path, capsys):
    from melanoma.cli.main import main as cli_main
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    data = tmp_path / "data"
    for index, (label, count) in enumerate((("NV", 6), ("VASC", 6))):
        for i in range(count):
            save_image(data / "Train" / label / f"ISIC_{100 * index + i:07d}.jpg", lesion_image(100 * index + i, 40))
        save_image(data / "Test" / label / f"ISIC_{100 * index + 50:07d}.jpg", lesion_image(100 * index + 50, 40))
    logged: list[str] = []
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="seed-cnn", epochs=1, batch_size=8,
                            image_size=32, progress=False, threads=1, bootstrap=0), log=logged.append)
    assert sum("no melanoma class" in line for line in logged) == 1
    out = tmp_path / "predictions.csv"
    capsys.readouterr()
    assert cli_main(["predict", str(run), str(data / "Test"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no melanoma class" in printed
    table = [line for line in printed.splitlines() if "ISIC_" in line]
    assert table and all(" n/a " in line and "0.000" not in line.split()[-2] for line in table)
    rows = list(csv.DictReader(out.open()))
    assert rows and all(row["melanoma_alert"] == "" for row in rows)


# --- 9. lesion ids scoped by their source ---------------------------------------------------------------------


def _numbered_manifest(folder, split: str, seed: int, lesion: str):
    save_image(folder / f"img{seed}.jpg", lesion_image(seed, 96))
    manifest = folder / "manifest.csv"
    manifest.write_text(f"image,label,lesion_id,split\nimg{seed}.jpg,melanoma,{lesion},{split}\n")
    return manifest


def test_two_manifests_numbering_lesions_from_one_make_no_false_same_lesion_leak(tmp_path):
    train = _numbered_manifest(tmp_path / "a", "Train", 1, "1")
    test = _numbered_manifest(tmp_path / "b", "Test", 2, "1")
    index = load_dataset([train, test])
    assert len({record.lesion_id for record in index.records}) == 2
    assert run_audit(index).cross_split_leaks == []


def test_globally_meaningful_lesion_ids_still_join_sources(tmp_path):
    train = _numbered_manifest(tmp_path / "a", "Train", 1, "HAM_0000007")
    test = _numbered_manifest(tmp_path / "b", "Test", 2, "HAM_0000007")
    index = load_dataset([train, test])
    assert {record.lesion_id for record in index.records} == {"HAM_0000007"}
    assert [leak["reason"] for leak in run_audit(index).cross_split_leaks] == ["same-lesion"]


# --- 11. a header that repeats a column -----------------------------------------------------------------------


def test_a_manifest_header_repeating_a_column_is_refused(tmp_path):
    save_image(tmp_path / "a.jpg", lesion_image(1))
    save_image(tmp_path / "b.jpg", lesion_image(2))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,label,image\na.jpg,melanoma,b.jpg\n")
    message = _one_line_error(read_manifest, manifest)
    assert "manifest.csv" in message and "column 'image' appears more than once" in message


def test_a_truth_file_header_repeating_a_column_is_refused(tmp_path):
    truth = tmp_path / "HAM10000_metadata.csv"
    truth.write_text("lesion_id,image_id,dx,dx\nHAM_1,ISIC_0000001,nv,mel\n")
    message = _one_line_error(load_ground_truth, [truth])
    assert "HAM10000_metadata.csv" in message and "column 'dx'" in message


# --- 12. several files for one ISIC id in an archive download -------------------------------------------------


def _download(tmp_path, names: dict[str, int], rows: list[str]):
    folder = tmp_path / "download"
    for name, seed in names.items():
        save_image(folder / name, lesion_image(seed))
    (folder / "metadata.csv").write_text(ARCHIVE_HEADER + "".join(row + "\n" for row in rows))
    return folder


def test_the_exact_name_is_taken_when_one_id_has_several_files(tmp_path):
    folder = _download(tmp_path, {"ISIC_0000141.jpg": 1, "ISIC_0000141 (copy).jpg": 2, "ISIC_0000142.png": 3,
                                  "ISIC_0000142.jpg": 4, "ISIC_0000143.jpg": 5},
                       [f"ISIC_0000141,x,CC-0,{MEL_ROW},dermoscopic,", f"ISIC_0000142,x,CC-0,{NEVUS_ROW},dermoscopic,",
                        f"ISIC_0000143,x,CC-0,{NEVUS_ROW},dermoscopic,"])
    index = read_archive_download(folder)
    assert sorted(record.rel_path for record in index.records) == [
        "ISIC_0000141.jpg", "ISIC_0000142.jpg", "ISIC_0000143.jpg"]
    said = "\n".join(index.warnings)
    assert "ISIC_0000141 (copy).jpg, ISIC_0000141.jpg); took ISIC_0000141.jpg" in said
    assert "ISIC_0000142.jpg, ISIC_0000142.png); took ISIC_0000142.jpg" in said


def test_without_the_exact_name_neither_file_is_used_and_both_are_named(tmp_path):
    folder = _download(tmp_path, {"ISIC_0000141 (1).jpg": 1, "ISIC_0000141 (copy).png": 2, "ISIC_0000143.jpg": 3},
                       [f"ISIC_0000141,x,CC-0,{MEL_ROW},dermoscopic,", f"ISIC_0000143,x,CC-0,{NEVUS_ROW},dermoscopic,"])
    index = read_archive_download(folder)
    assert [record.image_id for record in index.records] == ["ISIC_0000143"]
    assert "ISIC_0000141 (1).jpg, ISIC_0000141 (copy).png" in "\n".join(index.warnings)
    assert index.sources[0]["skipped"] == {"several image files for one ISIC id, none named <id>.jpg": 1}


# --- LOW: messages and paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, said", [
    ("", "empty file"),
    ("\n\n  \n", "empty file"),
    ('image,label\na.jpg,"melanoma\nb.jpg,nevus\n', "unclosed quote at line 2"),
    ('image,label\na.jpg,melanoma\n\n"b.jpg,nevus\n', "unclosed quote at line 4"),
    ("image,label\na.jpg,\n", "row 2 (a.jpg): empty 'label'"),
])
def test_broken_manifests_get_clear_one_line_messages(tmp_path, body, said):
    save_image(tmp_path / "a.jpg", lesion_image(1))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(body)
    message = str(pytest.raises(DataError, read_manifest, manifest).value)
    assert said in message and "manifest.csv" in message
    assert "no columns" not in message and "unknown label ''" not in message


def test_nul_and_control_characters_are_escaped_in_messages(tmp_path):
    from melanoma.data.csvfiles import printable

    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"image,label\nx\x1b[2J.jpg,mel\x00anoma\n")
    message = str(pytest.raises(DataError, read_manifest, manifest).value)
    assert "\x00" not in message and "\x1b" not in message
    assert "mel\\x00anoma" in message and "x\\x1b[2J.jpg" in message
    assert printable("a\u202eb\nc") == "a\\u202eb\\nc"


def test_an_archive_metadata_without_isic_id_says_so(tmp_path):
    folder = tmp_path / "download"
    save_image(folder / "ISIC_0000001.jpg", lesion_image(1))
    (folder / "metadata.csv").write_text("image,diagnosis_1\nISIC_0000001,Benign\n")
    for call in (load_dataset, read_archive_download):
        message = _one_line_error(call, folder)
        assert "metadata.csv" in message and "no 'isic_id' column" in message


def test_image_type_is_matched_in_any_case(tmp_path):
    folder = _download(tmp_path, {"ISIC_0000001.jpg": 1, "ISIC_0000002.jpg": 2},
                       [f"ISIC_0000001,x,CC-0,{MEL_ROW},Dermoscopic,", f"ISIC_0000002,x,CC-0,{NEVUS_ROW},DERMOSCOPIC,"])
    assert len(read_archive_download(folder).records) == 2


def test_manifest_paths_leading_out_of_their_folder_are_refused(tmp_path):
    outside = save_image(tmp_path / "elsewhere" / "ISIC_0000009.jpg", lesion_image(9))
    folder = tmp_path / "data"
    save_image(folder / "ISIC_0000001.jpg", lesion_image(1))
    os.symlink(outside, folder / "link.jpg")
    for image in (str(outside), "../elsewhere/ISIC_0000009.jpg", "link.jpg"):
        manifest = folder / "manifest.csv"
        manifest.write_text(f"image,label\nISIC_0000001.jpg,nevus\n{image},melanoma\n")
        message = str(pytest.raises(DataError, read_manifest, manifest).value)
        assert "lies outside" in message and "--image-root" in message


def test_an_explicit_image_root_reads_files_under_it(tmp_path):
    images = tmp_path / "images"
    save_image(images / "a" / "ISIC_0000001.jpg", lesion_image(1))
    save_image(images / "b" / "ISIC_0000002.jpg", lesion_image(2))
    manifest = tmp_path / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"image,label\na/ISIC_0000001.jpg,nevus\n{images / 'b' / 'ISIC_0000002.jpg'},melanoma\n")
    index = read_manifest(manifest, image_root=images)
    assert sorted(record.rel_path for record in index.records) == ["a/ISIC_0000001.jpg", "b/ISIC_0000002.jpg"]
    manifest.write_text("image,label\n../lists/manifest.csv,nevus\n")
    assert "lies outside" in str(pytest.raises(DataError, read_manifest, manifest, image_root=images).value)


def test_a_truth_file_with_a_bad_number_is_a_one_line_error(tmp_path):
    truth = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    truth.write_text("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_0000001,yes,0,0,0,0,0,0,0,0\n")
    message = _one_line_error(load_ground_truth, [truth])
    assert "row 2: 'MEL' is not a number ('yes')" in message
