"""Official ISIC truth files: format detection, mapping to the nine classes, and how sources combine."""
from __future__ import annotations

import pytest

from melanoma.core.errors import DataError
from melanoma.data.truth import load_ground_truth


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def three_files(tmp_path):
    ham = _write(tmp_path, "ham.csv", "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
                 "HAM_1,ISIC_1,akiec,histo,1,m,x,y\nHAM_2,ISIC_2,bkl,histo,1,m,x,y\nHAM_3,ISIC_5,akiec,histo,1,m,x,y\n")
    isic2019 = _write(tmp_path, "g2019.csv", "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
                      "ISIC_1,0,0,0,0,0,0,0,1,0\nISIC_3,0,0,0,0,0,0,0,0,1\nISIC_5,0,0,0,1,0,0,0,0,0\n")
    isic2017 = _write(tmp_path, "g2017.csv", "image_id,melanoma,seborrheic_keratosis\n"
                      "ISIC_4,0.0,1.0\nISIC_6,0.0,0.0\nISIC_7,1.0,0.0\n")
    return [isic2017, isic2019, ham]  # deliberately not in precedence order


def test_sources_combine_to_the_most_specific_label(three_files):
    truth = load_ground_truth(three_files)
    assert truth.sources == ["ham.csv", "g2019.csv", "g2017.csv"]
    scc = truth.label_for("ISIC_1")  # HAM akiec (AK or Bowen's SCC in situ) + ISIC 2019 SCC
    assert (scc.label, scc.source) == ("squamous cell carcinoma", "g2019.csv")
    assert not scc.contradicts("squamous cell carcinoma") and scc.contradicts("actinic keratosis")
    ak = truth.label_for("ISIC_5")
    assert ak.label == "actinic keratosis" and ak.contradicts("nevus")
    assert truth.lesion_ids["ISIC_1"] == "HAM_1"


def test_benign_keratosis_agrees_with_both_keratosis_folders(three_files):
    truth = load_ground_truth(three_files)
    bkl = truth.label_for("ISIC_2")
    assert not bkl.contradicts("pigmented benign keratosis") and not bkl.contradicts("seborrheic keratosis")
    assert bkl.contradicts("melanoma")
    sk = truth.label_for("ISIC_4")
    assert sk.label == "seborrheic keratosis" and not sk.contradicts("pigmented benign keratosis")


def test_isic2017_and_unknown_rows(three_files):
    truth = load_ground_truth(three_files)
    assert truth.label_for("ISIC_6").label == "nevus"
    assert truth.label_for("ISIC_7").label == "melanoma"
    assert truth.label_for("ISIC_3") is None  # UNK carries no label


def test_unknown_file_and_missing_file_and_bad_dx(tmp_path):
    with pytest.raises(DataError, match="not a known ISIC truth file"):
        load_ground_truth([_write(tmp_path, "x.csv", "a,b\n1,2\n")])
    with pytest.raises(DataError, match="truth file not found"):
        load_ground_truth([tmp_path / "missing.csv"])
    bad = _write(tmp_path, "h.csv", "lesion_id,image_id,dx\nH,ISIC_1,zzz\n")
    with pytest.raises(DataError, match="row 2: unknown dx 'zzz'"):
        load_ground_truth([bad])
