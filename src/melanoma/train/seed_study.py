"""``melanoma experiment seed-study``: the course notebook's three experiments, run with its leaky protocol and
leak-free, each scored on the Test folder.

The notebook's story: a baseline CNN overfits (val acc 0.54), augmentation makes it underfit (0.48), and adding 500
Augmentor rotations per class "fixes" it (0.88). That last number is leakage: the rotated copies were written into the
Train folder *before* the 80/20 split, so validation images were trained on through their copies.

- ``leaky``: the notebook's protocol. Folders as they are (no cleaning), expanded before a random 80/20 split.
- ``leak-free``: audit-cleaned data, a lesion-grouped stratified split, expansion of the training part only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from melanoma.config import TrainConfig
from melanoma.core.io import atomic_write_text, read_json, save_figure, write_json
from melanoma.runs.layout import CHECKPOINT_DIR, LAST, METRICS
from melanoma.train.pipeline import train


@dataclass(frozen=True)
class SeedExperiment:
    name: str
    model: str
    preset: str
    balance: str
    epochs: int
    notebook_val_acc: float


SEED_EXPERIMENTS = (
    SeedExperiment("baseline", "seed-cnn", "none", "none", 20, 0.54),
    SeedExperiment("augmented", "seed-cnn-aug", "seed", "none", 20, 0.48),
    SeedExperiment("rebalanced", "seed-cnn-dropout", "none", "expand:500", 30, 0.88),
)
PROTOCOLS = ("leaky", "leak-free")


def experiment_config(base: TrainConfig, experiment: SeedExperiment, protocol: str, out: Path,
                      epochs: int | None) -> TrainConfig:
    return replace(base, out=str(out / f"{experiment.name}-{protocol}"), model=experiment.model, recipe="seed",
                   preset=experiment.preset, balance=experiment.balance, epochs=epochs or experiment.epochs,
                   protocol=protocol, clean=protocol == "leak-free", resume=_unfinished(out, experiment, protocol),
                   overwrite=base.overwrite or _never_started(out, experiment, protocol))


def _never_started(out: Path, experiment: SeedExperiment, protocol: str) -> bool:
    """A run folder left by a start that died before its first checkpoint holds nothing worth keeping."""
    run_dir = out / f"{experiment.name}-{protocol}"
    return run_dir.exists() and not (run_dir / "checkpoints" / "last.ckpt").is_file() \
        and not (run_dir / METRICS).is_file()


def _unfinished(out: Path, experiment: SeedExperiment, protocol: str) -> bool:
    """A run that started but did not finish (killed, say) continues from its last checkpoint."""
    run_dir = out / f"{experiment.name}-{protocol}"
    return (run_dir / CHECKPOINT_DIR / LAST).is_file() and not (run_dir / METRICS).is_file()


def run_seed_study(base: TrainConfig, out: str | Path, epochs: int | None = None,
                   experiments: tuple[str, ...] | None = None, log=print) -> dict:
    """Run (or resume, where a run already finished) every experiment under both protocols; write the comparison."""
    out = Path(out)
    rows = []
    for experiment in SEED_EXPERIMENTS:
        if experiments and experiment.name not in experiments:
            continue
        for protocol in PROTOCOLS:
            config = experiment_config(base, experiment, protocol, out, epochs)
            run_dir = Path(config.out)
            if (run_dir / METRICS).is_file() and not base.overwrite:
                log(f"== {experiment.name} ({protocol}): already done, reusing {run_dir}")
            else:
                log(f"== {experiment.name} ({protocol}): {config.model}, preset {config.preset}, "
                    f"balance {config.balance}, {config.epochs} epochs")
                train(config, log=log)
            rows.append(_row(experiment, protocol, run_dir))
    table = {"experiments": rows, "note": "validation = the run's own validation split (leaky or not); "
             "test = the 118-image Test folder, 'clean' = Test images not leaked into Train"}
    write_json(out / "seed_study.json", table)
    atomic_write_text(out / "seed_study.md", seed_study_markdown(rows))
    save_figure(seed_study_figure(rows), out / "seed_study.png")
    log(seed_study_markdown(rows))
    return table


def _row(experiment: SeedExperiment, protocol: str, run_dir: Path) -> dict:
    metrics = read_json(run_dir / METRICS)
    history = metrics.get("final_epoch", {})
    test_all, test_clean = metrics["test"]["all"], metrics["test"]["clean"]
    return {"experiment": experiment.name, "protocol": protocol, "model": experiment.model,
            "balance": experiment.balance, "epochs": metrics["epochs_run"],
            "notebook_val_acc": experiment.notebook_val_acc,
            "final_val_acc": history.get("val_acc"), "best_val_acc": metrics["validation"]["accuracy"],
            "test_acc": test_all["accuracy"], "test_balanced_acc": test_all["balanced_accuracy"],
            "test_macro_f1": test_all["macro_f1"],
            "test_melanoma_recall": test_all["melanoma"]["recall_top_class"],
            "clean_test_acc": test_clean["accuracy"], "clean_test_balanced_acc": test_clean["balanced_accuracy"],
            "run": str(run_dir)}


def seed_study_markdown(rows: list[dict]) -> str:
    header = ("| experiment | protocol | notebook val acc | our val acc (last epoch) | Test acc | Test balanced acc "
              "| Test macro F1 | Test melanoma recall | clean-Test acc |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['protocol']} | {r['notebook_val_acc']:.2f} | {_f(r['final_val_acc'])} "
                     f"| {_f(r['test_acc'])} | {_f(r['test_balanced_acc'])} | {_f(r['test_macro_f1'])} "
                     f"| {_f(r['test_melanoma_recall'])} | {_f(r['clean_test_acc'])} |")
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def seed_study_figure(rows: list[dict]):
    import numpy as np
    from matplotlib.figure import Figure

    names = [f"{r['experiment']}\n{r['protocol']}" for r in rows]
    series = [("validation acc (last epoch)", "final_val_acc"), ("Test acc", "test_acc"),
              ("Test balanced acc", "test_balanced_acc")]
    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    positions = np.arange(len(rows))
    for offset, (label, key) in enumerate(series):
        values = [r[key] if r[key] is not None else np.nan for r in rows]
        bars = axes.bar(positions + offset * width, values, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(positions + width, names, fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("score")
    axes.set_title("Seed notebook experiments: leaky validation vs held-out Test")
    axes.legend(fontsize=8)
    return figure
