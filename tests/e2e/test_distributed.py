"""Distributed training: the batch sharding, which process writes, and a real 2-process DDP run on CPU (gloo)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_dataset
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from melanoma.train.distributed import ShardedBatchSampler, is_launch_rank_zero

# --------------------------------------------------------------------------------------------------------------------
# ShardedBatchSampler


def shards(count: int, batch_size: int, world_size: int) -> list[list[list[int]]]:
    return [list(ShardedBatchSampler(SequentialSampler(range(count)), batch_size, rank, world_size))
            for rank in range(world_size)]


@pytest.mark.parametrize("count, world_size", [
    (count, world_size) for world_size in (2, 3) for count in (2, 3, 7, 15, 16, 17, 33, 64, 65, 100)
    if count >= world_size])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_every_sample_goes_to_exactly_one_process(count, batch_size, world_size):
    per_rank = shards(count, batch_size, world_size)
    seen = [index for batches in per_rank for batch in batches for index in batch]
    assert sorted(seen) == list(range(count))  # once each: none repeated (no padding), none dropped
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps everywhere, or DDP hangs
    assert all(batch for batches in per_rank for batch in batches)  # no process gets an empty batch
    sampler = ShardedBatchSampler(SequentialSampler(range(count)), batch_size, 0, world_size)
    assert len(sampler) == len(per_rank[0])


def test_one_process_batches_exactly_like_a_batch_sampler():
    generator = torch.Generator().manual_seed(3)
    reference = list(BatchSampler(RandomSampler(range(37), generator=generator), 8, drop_last=False))
    generator.manual_seed(3)
    sharded = ShardedBatchSampler(RandomSampler(range(37), generator=generator), 8)
    assert list(sharded) == reference and len(sharded) == len(reference) == 5


def test_every_process_draws_the_same_epoch_order():
    orders = []
    for rank in range(2):
        generator = torch.Generator().manual_seed(7)
        orders.append(list(ShardedBatchSampler(RandomSampler(range(20), generator=generator), 4, rank, 2)))
    merged = [i for batch_pair in zip(*orders) for batch in batch_pair for i in batch]
    assert sorted(merged) == list(range(20))


def test_fewer_samples_than_processes_is_a_clear_error():
    with pytest.raises(ValueError, match="3 samples cannot be shared between 4 processes"):
        list(ShardedBatchSampler(SequentialSampler(range(3)), 2, 0, 4))


@pytest.mark.parametrize("environment, expected", [
    ({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),          # first process of the second machine
    ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "0"}, False),  # torchrun
    ({"SLURM_PROCID": "0"}, True), ({"SLURM_PROCID": "5"}, False)])
def test_only_global_rank_zero_writes(monkeypatch, environment, expected):
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert is_launch_rank_zero() is expected


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "ddp_spawn"], "invalid choice"), (["--devices", "0"], "at least 1"),
    (["--devices", "two"], "not a device count"), (["--accelerator", "tpu"], "invalid choice")])
def test_bad_distributed_flags_are_refused(tmp_path, capsys, flags, message):
    from melanoma.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "at least 1"), (["--devices", "-2"], "at least 1"), (["--batch-size", "0"], "between 1 and"),
    (["--devices", "x"], "whole number")])
def test_bad_predict_flags_are_refused(tmp_path, capsys, flags, message):
    from melanoma.cli.main import main

    out = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), str(tmp_path), "--out", str(out), *flags])
    assert message in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# A real DDP run: 2 CPU processes, gloo


HELPER = Path(__file__).parents[1] / "helpers" / "ddp_train.py"
DDP_FLAGS = ["--model", "seed-cnn", "--image-size", "32", "--batch-size", "4", "--threads", "1", "--preset", "seed",
             "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--precision", "32-true",
             "--no-progress", "--seed", "5"]


def run_ddp(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    environment |= {"SEEN_DIR": str(tmp_path / "seen"), "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, str(HELPER), "train", *args, *DDP_FLAGS], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def seen_per_epoch(seen_dir: Path) -> dict[int, list[list[int]]]:
    """rank -> per epoch, the training sample indices that process loaded."""
    epochs_by_rank = {}
    for path in sorted(seen_dir.glob("rank-*.txt")):
        epochs: list[list[int]] = []
        for line in path.read_text().split():
            if line == "epoch":
                epochs.append([])
            else:
                epochs[-1].append(int(line))
        epochs_by_rank[int(path.stem.split("-")[1])] = epochs
    return epochs_by_rank


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two epochs of DDP training on 2 CPU processes, then resumed for a third."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    (tmp_path / "seen").mkdir()
    data = tiny_dataset(tmp_path / "data", per_class=11, test_per_class=2)
    first = run_ddp(tmp_path, "--data", str(data), "--out", "run", "--epochs", "2")
    history_before_resume = read_history(tmp_path / "run")
    step_before_resume = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"]
    resumed = run_ddp(tmp_path, "--data", str(data), "--out", "run", "--epochs", "3", "--resume")
    return {"root": tmp_path, "data": data, "run": tmp_path / "run", "output": first.stdout + resumed.stdout,
            "history_before_resume": history_before_resume, "step_before_resume": step_before_resume}


def test_ddp_training_writes_exactly_one_run_folder(ddp_run):
    root = ddp_run["root"]
    assert sorted(p.name for p in root.iterdir()) == ["data", "run", "seen"]  # no second folder, no staging left
    assert sorted(p.name for p in (ddp_run["run"] / "checkpoints").iterdir()) == ["best.pt", "last.ckpt"]
    for name in ("config.json", "metrics.json", "history.csv", "curves.png", "report.html"):
        assert (ddp_run["run"] / name).is_file(), name
    assert ddp_run["output"].count("run folder:") == 2  # once per command, from rank 0 only
    assert sorted(p.name for p in (root / "seen").iterdir()) == ["rank-0.txt", "rank-1.txt"]  # two processes ran


def test_ddp_each_training_sample_is_seen_once_per_epoch(ddp_run):
    import json

    train_size = json.loads((ddp_run["run"] / "data.json").read_text())["train"]
    epochs = seen_per_epoch(ddp_run["root"] / "seen")
    assert len(epochs[0]) == len(epochs[1]) == 3  # 2 epochs, then 1 after --resume
    for epoch in range(3):
        rank0, rank1 = epochs[0][epoch], epochs[1][epoch]
        assert rank0 and rank1
        assert sorted(rank0 + rank1) == list(range(train_size)), f"epoch {epoch + 1}"


def test_ddp_validation_metrics_equal_a_single_process_evaluation(ddp_run):
    from melanoma.config import TrainConfig
    from melanoma.models.probabilities import predict_probabilities
    from melanoma.runs.checkpoint import load_checkpoint, model_from_checkpoint
    from melanoma.train.prepare import prepare_data

    payload = load_checkpoint(ddp_run["run"] / "checkpoints" / "best.pt")
    model, spec = model_from_checkpoint(payload)
    config = TrainConfig(data=str(ddp_run["data"]), out="unused", model="seed-cnn", image_size=32, seed=5,
                         preset="seed")
    data = prepare_data(config, log=lambda *_: None)
    probs = predict_probabilities(model, data.val_images, spec.image_size)
    loss = float(-np.log(probs[np.arange(len(probs)), data.val_labels]).mean())
    accuracy = float((probs.argmax(1) == data.val_labels).mean())
    logged = read_history(ddp_run["run"])[payload["epoch"] - 1]
    assert float(logged["val_acc"]) == pytest.approx(accuracy, abs=1e-12)
    assert float(logged["val_loss"]) == pytest.approx(loss, abs=1e-5)
    assert len(data.val_labels) % 2 == 1  # an odd validation set: padding would have counted one image twice


def test_ddp_resume_continues_from_the_saved_step(ddp_run):
    history = read_history(ddp_run["run"])
    assert [row["epoch"] for row in history] == ["1", "2", "3"]
    assert history[:2] == ddp_run["history_before_resume"]  # the first two epochs are kept as they were
    final = torch.load(ddp_run["run"] / "checkpoints" / "last.ckpt", weights_only=True)
    steps_per_epoch = ddp_run["step_before_resume"] // 2
    assert steps_per_epoch > 0 and final["global_step"] == 3 * steps_per_epoch
    assert final["epoch"] == 2  # Lightning counts epochs from 0
    counts = Counter(len(epoch) for epoch in seen_per_epoch(ddp_run["root"] / "seen")[0])
    assert len(counts) == 1  # the resumed epoch shared the same number of samples as the first two


# --------------------------------------------------------------------------------------------------------------------
# Distributed prediction


def test_predict_on_two_processes_merges_shards_in_input_order(tmp_path):
    from conftest import lesion_image, save_image, train_tiny_run

    from melanoma.cli.main import main

    _, run = train_tiny_run(tmp_path)
    inputs = tmp_path / "inputs"
    for i in range(7):
        save_image(inputs / f"ISIC_{9000 + i:07d}.jpg", lesion_image(9000 + i, 40))
    (inputs / "ISIC_0009003b.jpg").write_bytes(b"not a jpeg")  # an unreadable file keeps its row and its place
    assert main(["predict", str(run), str(inputs), "--out", str(tmp_path / "one.csv")]) == 0
    assert main(["predict", str(run), str(inputs), "--out", str(tmp_path / "two.csv"), "--devices", "2",
                 "--batch-size", "2"]) == 0
    one, two = (list(csv.DictReader(open(tmp_path / f"{n}.csv", newline=""))) for n in ("one", "two"))
    assert [row["file"] for row in two] == sorted(p.name for p in inputs.iterdir())
    assert [row["error"] != "" for row in two] == [False] * 4 + [True] + [False] * 3
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in ("file", "image", "top_class", "error", "melanoma_alert", "in_distribution", "reason"):
                assert a[key] == b[key]
            elif a[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-6)


def test_predict_on_more_gpus_than_the_machine_has_is_a_clear_error(tmp_path):
    from melanoma.core.errors import RunError
    from melanoma.deploy.predict import predict_sharded

    with pytest.raises(RunError, match=f"asked for 64 GPUs, this machine has {torch.cuda.device_count()}"):
        predict_sharded(tmp_path, [("a", b"")] * 64, devices=64, accelerator="gpu")
