"""Choosing the quick profile's training recipe fairly, by measurement, never on test images.

Each recipe of a small grid around the quick profile's recipe before the search (every one sees the same
images in the same number of steps, so costs the same CPU time but for the weight average's few extra
operations) trains the baseline *and each single improvement* (Mish, Triplet Attention, CNSN) on the
training set minus a class-balanced validation split of ``--validation`` images. A recipe is scored by the
mean validation accuracy over the four variants (the shared recipe: no variant's favourite), and each
variant's own best is kept too (the per-variant recipe), with the flip test-time-augmented accuracy reported
apart. One JSON per (variant, recipe, seed) goes to ``reports/recipes/`` (tracked by git: the evidence for
the quick profile's recipe); a finished one is read back, not retrained. Notebook 04 reads them (``analysis.recipes``).

    python -m mnv2lib.benchmarks.recipes                       # the whole grid, two runs side by side
    python -m mnv2lib.benchmarks.recipes --only before,lr0.1 --variants baseline,mish
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from ..engine.data import Dataset, balanced_order, channel_stats, load_dataset, validation_as_test
from ..engine.train import TrainConfig, evaluate, train_model
from ..models import build_model
from ..runs.profiles import PROFILES
from ..runs.spec import parse_factors
from ..utils import paths
from ..utils.io import write_json_atomic
from ..utils.provenance import git_commit

VARIANTS = ("baseline", "mish", "triplet", "cnsn")  # the baseline and each single improvement

# The grid's centre: the quick recipe before this search (chosen on the baseline alone), frozen here so that
# the records keep their meaning whichever recipe the quick profile adopts (notebook 04 finds the profile's
# recipe among them by its settings).
CENTRE = dict(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500, channels_last=True, zero_init_residual=True,
              augment=False)
CENTRE_TRAIN_SIZE = 20_000
# recipe name -> overrides of the centre: TrainConfig fields, and ``train_size`` (the distinct training
# images; the centre's are the quick profile's). Issue #29's grid: the ideas of the CIFAR speed-run
# literature that cost no extra steps, and the two choices made on the baseline alone; then a second
# round after the first had shown every variant underfitting: each image seen once (twice the distinct
# images in the same steps), alone and with the first round's best single change for three variants.
GRID: dict[str, dict] = {
    "before": {},
    "lr0.1": dict(lr=0.1),
    "no_zero_init": dict(zero_init_residual=False),
    "ema0.99": dict(ema_decay=0.99),
    "norm_lr4": dict(norm_lr_mult=4.0),
    "warmup0.05": dict(warmup_fraction=0.05),
    "distinct": dict(train_size=2 * CENTRE_TRAIN_SIZE, epochs=1),
    "distinct_norm_lr4": dict(train_size=2 * CENTRE_TRAIN_SIZE, epochs=1, norm_lr_mult=4.0),
}


def recipe_config(name: str) -> TrainConfig:
    """The grid's recipe ``name``: its centre with the recipe's training overrides."""
    if name not in GRID:
        raise ValueError(f"recipe: got {name!r}; allowed values are {tuple(GRID)}")
    return TrainConfig(**{**CENTRE, **{k: v for k, v in GRID[name].items() if k != "train_size"}})


def recipe_train_size(name: str) -> int:
    """The distinct training images of recipe ``name``."""
    recipe_config(name)  # the name checked
    return GRID[name].get("train_size", CENTRE_TRAIN_SIZE)


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None:
        return dataset
    order = balanced_order(dataset.train_labels, size, seed=seed, field="train_size")
    images = dataset.train_images[order]
    mean, std = channel_stats(images)
    return dataclasses.replace(dataset, train_images=images, train_labels=dataset.train_labels[order],
                               mean=mean, std=std)


def record_path(variant: str, recipe: str, seed: int):
    return paths.RECIPES_DIR / f"{variant}-{recipe}-seed{seed}.json"


def run_recipe(variant: str, recipe: str, dataset: Dataset, seed: int = 0, force: bool = False) -> dict:
    """Train ``variant`` under ``recipe`` on ``dataset`` (whose test set is a validation split); its record."""
    path = record_path(variant, recipe, seed)
    if path.exists() and not force:
        return json.loads(path.read_text())
    quick = PROFILES["quick"]
    config = recipe_config(recipe)
    overrides = {} if variant == "baseline" else parse_factors(variant)[variant]
    data = _subset(dataset, recipe_train_size(recipe), seed)
    model = build_model(num_classes=len(dataset.classes), width_mult=quick.width_mult, stem=quick.stem, **overrides)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train_model(model, data, config, seed=seed, show_progress=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    flipped = evaluate(model, data.test_images, data.test_labels, data.mean, data.std, config.eval_batch_size,
                       config.device, config.channels_last, flip=True)  # where train_model left the model
    record = {
        "variant": variant, "recipe": recipe, "seed": seed, "overrides": GRID[recipe], "train": config.to_dict(),
        "train_size": len(data.train_labels),
        "images_seen": len(data.train_labels) // config.batch_size * config.batch_size * config.epochs,
        "validation_accuracy": result.history[-1]["test_accuracy"], "validation_accuracy_flip": flipped["accuracy"],
        "train_accuracy": result.history[-1]["train_accuracy"], "validation_images": flipped["count"],
        "train_wall_seconds": wall, "train_cpu_seconds": cpu, "threads": torch.get_num_threads(),
        "dataset": data.description, "history": result.history,
        "commit": git_commit(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_json_atomic(path, record)
    return record


_WORKER: dict = {}


def _init_worker(dataset: Dataset, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["dataset"] = dataset


def _run_in_worker(variant: str, recipe: str, seed: int, force: bool) -> dict:
    return run_recipe(variant, recipe, _WORKER["dataset"], seed, force)


def _names(text: str, allowed: tuple, field: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] or list(allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{field}: unknown {unknown}; allowed values are {list(allowed)}")
    return names


def main(argv: list[str] | None = None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated recipes (default: all of {list(GRID)})")
    parser.add_argument("--variants", default="", help=f"comma-separated variants (default: {list(VARIANTS)})")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--validation", type=int, default=5000, help="validation images held out of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each (1: in turn, "
                        "all threads)")
    parser.add_argument("--force", action="store_true", help="retrain runs that have a record")
    args = parser.parse_args(argv)
    recipes, variants = _names(args.only, tuple(GRID), "--only"), _names(args.variants, VARIANTS, "--variants")
    full = load_dataset(args.dataset, train_size=None, test_size=10, progress=False)
    dataset = validation_as_test(full, args.validation, seed=args.seed)
    todo = [(v, r) for r in recipes for v in variants]
    context = multiprocessing.get_context("spawn")
    threads = 1 if args.workers > 1 else torch.get_num_threads()
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                             initargs=(dataset, threads)) as pool:
        jobs = [pool.submit(_run_in_worker, v, r, args.seed, args.force) for v, r in todo]
        for job in as_completed(jobs):
            r = job.result()
            print(f"{r['variant']:9s} {r['recipe']:14s} val {100 * r['validation_accuracy']:5.1f}%  flip "
                  f"{100 * r['validation_accuracy_flip']:5.1f}%  train {100 * r['train_accuracy']:5.1f}%  "
                  f"cpu {r['train_cpu_seconds']:6.1f} s  wall {r['train_wall_seconds']:6.1f} s", flush=True)
    print("the selection table: notebook 04, or mnv2lib.analysis.recipes.recipe_selection()")


if __name__ == "__main__":
    main()
