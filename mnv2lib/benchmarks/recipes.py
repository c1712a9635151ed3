"""Choosing the CPU quick profile's training recipe by measurement, never on test images.

Each recipe (data size, epochs, batch, learning rate, schedule, initialization, weight average,
model shape) trains the baseline MobileNetV2 on the training set minus a class-balanced
validation split of ``--validation`` images, and is scored by its validation accuracy against the
CPU time it took (process CPU seconds and wall seconds, both recorded). One JSON per recipe goes to
``reports/recipes/``; a finished recipe is read back, not retrained.

    python -m mnv2lib.benchmarks.recipes                 # every recipe in RECIPES
    python -m mnv2lib.benchmarks.recipes --only today,zero_init
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from ..engine.data import Dataset, balanced_order, channel_stats, load_dataset, validation_split
from ..engine.train import TrainConfig, train_model
from ..models import build_model
from ..utils import paths
from ..utils.io import write_json_atomic

RECIPES_DIR = paths.REPORTS_DIR / "recipes"

# name -> (data and model shape, TrainConfig overrides). `base` is the quick profile before this search.
BASE_SHAPE = dict(train_size=5000, width_mult=0.5, stem="cifar_lite", dropout=0.2)
BASE_TRAIN = dict(epochs=4, batch_size=128, lr=0.1, eval_batch_size=500, channels_last=True)


def _recipe(shape: dict | None = None, **train) -> tuple[dict, dict]:
    return {**BASE_SHAPE, **(shape or {})}, {**BASE_TRAIN, **train}


DISTINCT = dict(train_size=20000)
RECIPES: dict[str, tuple[dict, dict]] = {
    "today": _recipe(),
    "distinct": _recipe(DISTINCT, epochs=1),
    "distinct_b64": _recipe(DISTINCT, epochs=1, batch_size=64),
    "zero_init": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True),
    "zero_init_lr0.2": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, lr=0.2),
    "zero_init_noaug": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, augment=False),
    "zero_init_ema": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, ema_decay=0.99),
    "zero_init_ls0_dropout0": _recipe({**DISTINCT, "dropout": 0.0}, epochs=1, batch_size=64,
                                      zero_init_residual=True, label_smoothing=0.0),
    "zero_init_warmup0.05": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True,
                                    warmup_fraction=0.05),
    # second round: around zero-init without augmentation (the best of the first round)
    "zi_noaug_b128": _recipe(DISTINCT, epochs=1, zero_init_residual=True, augment=False),
    "zi_noaug_lr0.05": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, augment=False, lr=0.05),
    "zi_noaug_ls0_dropout0": _recipe({**DISTINCT, "dropout": 0.0}, epochs=1, batch_size=64,
                                     zero_init_residual=True, augment=False, label_smoothing=0.0),
    "zi_noaug_warmup0.05": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, augment=False,
                                   warmup_fraction=0.05),
    "zi_noaug_ema": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, augment=False,
                            ema_decay=0.99),
    "zi_noaug_b32_lr0.05": _recipe(DISTINCT, epochs=1, batch_size=32, zero_init_residual=True, augment=False,
                                   lr=0.05),
    # third round, at the best learning rate so far (0.05): more budget as distinct images or as repeats
    # (with and without augmentation), and a lower peak
    "zi_noaug_lr0.03": _recipe(DISTINCT, epochs=1, batch_size=64, zero_init_residual=True, augment=False, lr=0.03),
    "zi_noaug_lr0.05_40k": _recipe(dict(train_size=40000), epochs=1, batch_size=64, zero_init_residual=True,
                                   augment=False, lr=0.05),
    "zi_noaug_lr0.05_20k_x2": _recipe(DISTINCT, epochs=2, batch_size=64, zero_init_residual=True, augment=False,
                                      lr=0.05),
    "zi_aug_lr0.05_20k_x2": _recipe(DISTINCT, epochs=2, batch_size=64, zero_init_residual=True, lr=0.05),
}


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None:
        return dataset
    order = balanced_order(dataset.train_labels, size, seed=seed, field="train_size")
    images = dataset.train_images[order]
    mean, std = channel_stats(images)
    return dataclasses.replace(dataset, train_images=images, train_labels=dataset.train_labels[order],
                               mean=mean, std=std)


def run_recipe(name: str, dataset: Dataset, seed: int = 0, force: bool = False) -> dict:
    """Train one recipe on ``dataset`` (whose test set is a validation split); its record."""
    shape, train = RECIPES[name]
    path = RECIPES_DIR / f"{name}-seed{seed}.json"
    if path.exists() and not force:
        return json.loads(path.read_text())
    data = _subset(dataset, shape["train_size"], seed)
    config = TrainConfig(**train)
    torch.manual_seed(seed)
    model = build_model(num_classes=len(dataset.classes), width_mult=shape["width_mult"], stem=shape["stem"],
                        dropout=shape["dropout"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train_model(model, data, config, seed=seed, show_progress=False)
    record = {
        "recipe": name, "seed": seed, "shape": shape, "train": config.to_dict(),
        "images_seen": len(data.train_labels) // config.batch_size * config.batch_size * config.epochs,
        "validation_accuracy": result.history[-1]["test_accuracy"],
        "curve": [h["test_accuracy"] for h in result.history],
        "train_wall_seconds": time.perf_counter() - wall0, "train_cpu_seconds": time.process_time() - cpu0,
        "threads": torch.get_num_threads(), "dataset": data.description, "history": result.history,
    }
    write_json_atomic(path, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--validation", type=int, default=2000, help="validation images held out of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain recipes that have a record")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--only: unknown recipes {unknown}; allowed values are {list(RECIPES)}")
    full = load_dataset(args.dataset, train_size=None, test_size=10, progress=False)
    dataset = validation_split(full, args.validation, seed=args.seed)
    for name in names:
        r = run_recipe(name, dataset, args.seed, args.force)
        print(f"{name:28s} images {r['images_seen']:6d}  val {100 * r['validation_accuracy']:5.1f}%  "
              f"curve {[round(100 * a, 1) for a in r['curve']]}  wall {r['train_wall_seconds']:6.1f} s  "
              f"cpu {r['train_cpu_seconds']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
