"""The run folder's layout: one home for every file name, and one reader per file (split.csv, clean_manifest.csv,
audit.json), each with a one-line error naming the file."""
from __future__ import annotations

import pytest
from conftest import train_tiny_run

from melanoma.audit.manifest import CLEAN_MANIFEST, manifest_file, read_clean_manifest
from melanoma.audit.report import AUDIT_JSON, read_audit_json
from melanoma.core.errors import DataError, RunError
from melanoma.data.sources import RUN_FOLDER_FILES
from melanoma.runs.layout import CONFIG, SPLIT, SPLIT_COLUMNS, read_split, trained_files


def test_the_data_layer_marks_audit_and_run_folders_by_the_names_their_packages_own():
    assert RUN_FOLDER_FILES == (AUDIT_JSON, CONFIG, CLEAN_MANIFEST)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("layout"), per_class=6)[1]


def test_split_csv_has_one_reader_and_its_columns(run):
    rows = read_split(run)
    assert rows and set(rows[0]) == set(SPLIT_COLUMNS)
    assert {row["role"] for row in rows} == {"train", "val"}
    assert {row["path"] for row in read_split(run, ("train",))} == trained_files(run)
    assert all(row["role"] == "val" for row in read_split(run, ("val",)))


def test_a_missing_split_csv_is_one_line_naming_it(tmp_path):
    with pytest.raises(RunError, match=rf"^{tmp_path / SPLIT}: not found; is {tmp_path} a finished run folder"):
        read_split(tmp_path)


def test_the_run_s_own_audit_is_read_by_the_same_readers(run):
    audit = run / "audit"
    rows = read_clean_manifest(audit)
    assert rows == read_clean_manifest(audit / CLEAN_MANIFEST)  # the folder or the file, as --audit takes both
    assert manifest_file(audit) == manifest_file(audit / CLEAN_MANIFEST) == audit / CLEAN_MANIFEST
    assert {"key", "action"} <= set(rows[0])
    assert read_audit_json(audit)["summary"]["images"] == len(rows)
    assert read_audit_json(run) is None  # no audit.json: not an audit folder


def test_a_missing_clean_manifest_is_one_line_naming_it(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / CLEAN_MANIFEST}: no clean_manifest.csv there; run `melanoma"):
        read_clean_manifest(tmp_path)
