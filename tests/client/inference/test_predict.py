"""``fedtl-hospital predict``: a file, a folder or a manifest in, one CSV row per image out, nothing sent.

Prediction must read and preprocess a new study exactly as training did (so it sees what the site's
evaluation saw), must never stop on a bad file, and must work with the network down.
"""

from __future__ import annotations

import csv
import shutil
import socket
from pathlib import Path

import pytest
import torch

from client.hospital_daemon import main as hospital_main
from client.inference.predict import (
    STATUS_OK,
    STATUS_UNREADABLE,
    PredictInputError,
    discover_inputs,
    run_predictions,
)
from client.inference.site_model import load_site_model
from client.inference.site_model_record import SiteModelError
from tests.client.inference.conftest import GLOBAL_ID


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _images(site) -> list[Path]:  # noqa: ANN001
    return sorted((site.manifest.parent / "images").glob("*.dcm"))


def test_one_dicom_file_gives_one_row_with_every_class_probability_and_the_threshold(trained_site, tmp_path,  # noqa: ANN001
                                                                                    capsys) -> None:  # noqa: ANN001
    image = _images(trained_site)[0]
    out = tmp_path / "one.csv"
    assert hospital_main(["predict", str(image), "--state-dir", str(trained_site.state_dir), "--out", str(out),
                          "--no-progress"]) == 0
    (row,) = _rows(out)
    assert row["path"] == str(image) and row["status"] == STATUS_OK
    assert row["predicted_class"] in ("normal", "finding")
    assert float(row["p_normal"]) + float(row["p_finding"]) == pytest.approx(1.0, abs=1e-5)
    assert float(row["threshold"]) == pytest.approx(load_site_model(trained_site.state_dir).operating_point.threshold,
                                                    abs=1e-6)
    assert row["predicted_class"] == ("finding" if float(row["p_finding"]) >= float(row["threshold"]) else "normal")
    printed = capsys.readouterr().out
    assert "1 predicted, 0 unreadable" in printed and "images/s" in printed


def test_a_folder_gives_a_row_per_file_in_sorted_order(trained_site, tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "studies"
    for image in _images(trained_site)[:5]:
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / "sub" / image.name)
    out = tmp_path / "folder.csv"
    assert hospital_main(["predict", str(folder), "--state-dir", str(trained_site.state_dir), "--out", str(out),
                          "--no-progress", "--batch-size", "2"]) == 0
    rows = _rows(out)
    assert [r["path"] for r in rows] == [f"sub/{p.name}" for p in _images(trained_site)[:5]]
    assert all(r["status"] == STATUS_OK for r in rows)


@pytest.mark.parametrize("site_fixture", ["trained_site", "finetuned_site"])
def test_a_manifest_predicts_what_the_sites_own_evaluation_saw(site_fixture: str, request) -> None:  # noqa: ANN001
    """The test patients' probabilities equal the personal head on the session's cached features (same pixels),
    also when the personal model holds the site's own fine-tuned copy of the shared layers."""
    trained_site = request.getfixturevalue(site_fixture)
    session = trained_site.session
    model = load_site_model(trained_site.state_dir)
    inputs = discover_inputs(trained_site.manifest)
    run = run_predictions(model, inputs, progress=False, batch_size=7)
    assert len(run.predictions) == len(inputs) and all(p.status == STATUS_OK for p in run.predictions)
    head = session._personal_head(GLOBAL_ID)
    assert model.personal_layers == head.layers == ("fine-tuned" if site_fixture == "finetuned_site" else "global")
    expected = head.logits(session.personal_features(head, session.test).double()).softmax(1)
    by_path = {p.shown: p.probabilities for p in run.predictions}
    manifest_rows = _rows(trained_site.manifest)
    test_paths = _test_paths(session, manifest_rows)
    got = torch.tensor([by_path[path] for path in test_paths])
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)


def _test_paths(session, manifest_rows: list[dict[str, str]]) -> list[str]:  # noqa: ANN001
    """The manifest paths of the session's test split, in split order (the split is by patient, stable order)."""
    from common.data.patient_split import split_by_patient

    labels = [0 if r["label"] == "normal" else 1 for r in manifest_rows]
    _, test_idx = split_by_patient([r["patient_id"] for r in manifest_rows], labels,
                                   session.config.data.test_fraction, session.config.data.split_seed)
    return [manifest_rows[i]["path"] for i in test_idx]


def test_an_unreadable_file_gets_a_row_with_its_reason_and_the_batch_goes_on(trained_site, tmp_path) -> None:  # noqa: ANN001
    good = _images(trained_site)[:3]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in good:
        shutil.copy(image, folder / image.name)
    (folder / "b_corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x13\x37" * 40)
    (folder / "c_truncated.dcm").write_bytes(good[0].read_bytes()[:400])
    manifest = tmp_path / "mixed.csv"
    names = ["b_corrupt.dcm", good[0].name, "missing.dcm", "c_truncated.dcm", good[1].name, good[2].name]
    manifest.write_text("path,label\n" + "".join(f"mixed/{n},normal\n" for n in names))
    out = tmp_path / "mixed-out.csv"
    assert hospital_main(["predict", str(manifest), "--state-dir", str(trained_site.state_dir), "--out", str(out),
                          "--no-progress", "--batch-size", "4"]) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert [r for r in rows] == [f"mixed/{n}" for n in names]  # every input, in order
    for bad in ("b_corrupt.dcm", "missing.dcm", "c_truncated.dcm"):
        row = rows[f"mixed/{bad}"]
        assert row["status"] == STATUS_UNREADABLE and row["reason"] and not row["p_finding"], row
    assert "not found" in rows["mixed/missing.dcm"]["reason"]
    for image in good:
        assert rows[f"mixed/{image.name}"]["status"] == STATUS_OK


def test_prediction_and_its_saliency_maps_work_with_the_network_down(trained_site, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network is down (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    folder = tmp_path / "offline"
    folder.mkdir()
    for image in _images(trained_site)[:2]:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "offline.csv"
    assert hospital_main(["predict", str(folder), "--state-dir", str(trained_site.state_dir), "--out", str(out),
                          "--saliency", str(tmp_path / "maps"), "--no-progress"]) == 0
    assert all(r["status"] == STATUS_OK and Path(r["saliency_png"]).is_file() for r in _rows(out))
    assert attempts == []


def test_a_state_directory_without_a_finished_model_is_refused_naming_the_file_and_the_fix(trained_site, tmp_path,  # noqa: ANN001
                                                                                          capsys) -> None:  # noqa: ANN001
    broken = tmp_path / "state-copy"
    shutil.copytree(trained_site.state_dir, broken)
    (broken / "personal_head.pt").unlink()
    with pytest.raises(SiteModelError, match=r"personal_head\.pt is missing"):
        load_site_model(broken)
    (broken / "site_model.json").unlink()
    image = _images(trained_site)[0]
    assert hospital_main(["predict", str(image), "--state-dir", str(broken), "--out", str(tmp_path / "x.csv")]) == 2
    assert "site_model.json is missing" in capsys.readouterr().err
    with pytest.raises(PredictInputError, match="no such file or folder"):
        discover_inputs(tmp_path / "nowhere")


def test_a_manifest_brings_the_clinical_values_a_model_fuses_missing_ones_as_in_training(tmp_path) -> None:  # noqa: ANN001
    manifest = tmp_path / "studies.csv"
    manifest.write_text("path,age,label\na.dcm,52,normal\nb.dcm,,finding\nc.dcm,old,normal\n")
    first, missing, wrong = discover_inputs(manifest, ["age"])
    assert first.clinical == (52.0,) and not first.problem and first.path == tmp_path / "a.dcm"
    assert missing.clinical == (0.0,) and not missing.problem  # training fills a missing value with 0
    assert "'age' is not a number" in wrong.problem
    with pytest.raises(PredictInputError, match=r"column\(s\) sex missing"):
        discover_inputs(manifest, ["age", "sex"])
