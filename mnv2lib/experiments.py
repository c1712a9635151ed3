"""Experiment runs and the results store.

A run is (model config, training profile, dataset, seed). Its record goes to
``reports/results/<key>.json``, written atomically, keyed by a hash of all four, so a
finished run is never recomputed and every notebook reuses the same trained models
(their weights stay in ``reports/runs/<key>/``). Runs checkpoint every epoch: killing
the process loses at most the current epoch.
"""
from __future__ import annotations

import dataclasses
import re
import datetime as _dt
import hashlib
import json
import os
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from . import paths
from .allocator import keep_freed_memory
from .checks import is_number
from .data import save_atomic
from .models import ModelConfig, build_model
from .progress import progress
from .train import (CheckpointError, NonFiniteLossError, TrainConfig, distributed_context, evaluate, resolve_device,
                    train_model)

RECORD_VERSION = 1
STATUSES = ("running", "finished", "failed")


class BadRecordWarning(UserWarning):
    """A file in the results store is not a valid run record; it is skipped (and the run redone when needed)."""


class CorruptRunError(ValueError):
    """A finished run's weights file cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class Profile:
    """How much to train and evaluate: a budget, chosen for a machine."""

    name: str
    train_size: int | None            # training images (class-balanced subset); None = all
    test_size: int | None             # clean test images; None = all
    corruption_test_size: int         # test images per corruption set
    severities: tuple = (1, 2, 3, 4, 5)
    corruptions: tuple | None = None  # None = all 15
    width_mult: float = 0.5
    stem: str = "cifar"
    seeds: tuple = (0, 1)
    train: TrainConfig = field(default_factory=TrainConfig)
    cost_input_size: int = 32         # input side for latency and memory measurements
    cost_train_batch: int | None = None  # batch of the CPU training-step cost measurement (None: the training batch)
    cost_repeats: int = 3             # timed repeats per cost measurement (1: seconds, for tests)
    dropout: float | None = None      # classifier dropout of every model (None: the model's default, 0.2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d


QUICK_TRAIN_SIZE = 20000
QUICK_TRAIN = dict(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500, channels_last=True,
                   zero_init_residual=True, augment=False)

PROFILES: dict[str, Profile] = {
    # seconds: for tests and for checking that every notebook runs end to end
    "smoke": Profile("smoke", train_size=256, test_size=128, corruption_test_size=64, severities=(3,),
                     corruptions=("gaussian_noise", "defocus_blur", "contrast"), width_mult=0.25, stem="cifar_lite",
                     seeds=(0, 1), cost_repeats=1,
                     train=TrainConfig(epochs=1, batch_size=64, lr=0.05, eval_batch_size=256)),
    # the whole 2^3 ablation, 2 seeds, on a 2-core CPU in at most half an hour (README: "Profiles").
    # The recipe was chosen by validation accuracy per CPU-second (python -m mnv2lib.recipes, README:
    # "Choosing the quick recipe"): distinct images rather than repeated epochs, zero-initialized residual
    # BN scales, no augmentation at a budget where no image is seen twice.
    "quick": Profile("quick", train_size=QUICK_TRAIN_SIZE, test_size=None, corruption_test_size=200, width_mult=0.5,
                     stem="cifar_lite", seeds=(0, 1),
                     train=TrainConfig(**QUICK_TRAIN)),
    # the papers' regime on one H100/H200-class GPU: the 8 ablation variants x 1 seed in about twelve
    # minutes (README: "GPU profile"). Data lives on the GPU as uint8 and is augmented there; bf16
    # autocast, channels_last, batch 512 with a warm-up, no per-step host syncs.
    "gpu": Profile("gpu", train_size=None, test_size=None, corruption_test_size=1000, width_mult=1.0,
                   stem="cifar", seeds=(0,), cost_train_batch=64,
                   train=TrainConfig(epochs=15, batch_size=512, lr=0.4, warmup_fraction=0.15, eval_batch_size=1000,
                                     channels_last=True, zero_init_residual=True, amp_dtype="bfloat16")),
    # paper-like CIFAR-10 training, for a GPU
    "full": Profile("full", train_size=None, test_size=None, corruption_test_size=10000, width_mult=1.0,
                    stem="cifar", seeds=(0, 1, 2),
                    train=TrainConfig(epochs=200, batch_size=128, lr=0.1, eval_batch_size=1000, channels_last=True)),
}


def budget_rung(profile: Profile, factor: int, max_train_size: int = 50_000) -> Profile:
    """``profile`` with ``factor`` times its training budget, named ``<name>_x<factor>``: more distinct
    images while the training set (``max_train_size``) allows, then more epochs; one seed."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: got {factor!r}; allowed values are integers >= 1")
    size, epochs = (profile.train_size or max_train_size) * factor, profile.train.epochs
    while size > max_train_size and size % 2 == 0:
        size, epochs = size // 2, epochs * 2
    return dataclasses.replace(profile, name=f"{profile.name}_x{factor}", train_size=size, seeds=(0,),
                               train=dataclasses.replace(profile.train, epochs=epochs))


def base_profile_name(profile: str | Profile) -> str:
    """The name of the profile a budget-ladder rung (``<name>_x<factor>``) was made from; other
    profiles' own names. Work sizes and plans keyed by profile use it, so a rung does its base's work."""
    name = getattr(profile, "name", profile)
    if isinstance(name, str) and re.fullmatch(r"\w+_x\d+", name):
        return name.rsplit("_x", 1)[0]
    return name


# The budget ladder (notebook 04): the quick budget, and 2x and 4x it for the baseline and each single
# improvement; `make ladder` trains the upper rungs (outside `make reports`' budget).
LADDER_FACTORS = (2, 4)
for _factor in LADDER_FACTORS:
    _rung = budget_rung(PROFILES["quick"], _factor)
    PROFILES[_rung.name] = _rung


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile: got {profile!r}; allowed values are {tuple(PROFILES)}")
    return PROFILES[profile]


# The 2^3 ablation: each improvement switched on or off.
IMPROVEMENTS = {"mish": dict(activation="mish"), "triplet": dict(attention="triplet"), "cnsn": dict(cnsn="cnsn")}


def ablation_configs(base: dict | None = None) -> list[dict]:
    """The eight model-config overrides of the 2^3 ablation, baseline first."""
    names = list(IMPROVEMENTS)
    configs = []
    for mask in range(2 ** len(names)):
        overrides = dict(base or {})
        for i, name in enumerate(names):
            if mask >> i & 1:
                overrides.update(IMPROVEMENTS[name])
        configs.append(overrides)
    return sorted(configs, key=lambda c: (len([k for k in c if k not in (base or {})]), str(sorted(c.items()))))


def model_config_for(overrides: dict, profile: Profile, num_classes: int) -> ModelConfig:
    """Profile defaults (width, stem) < the overrides; num_classes from the dataset."""
    fields = {"width_mult": profile.width_mult, "stem": profile.stem, **overrides, "num_classes": num_classes}
    if profile.dropout is not None:
        fields.setdefault("dropout", profile.dropout)
    return ModelConfig(**fields)


@dataclass(frozen=True)
class RunRequest:
    """What a notebook asks the store for: build_model overrides, trained with each of ``seeds``."""

    overrides: dict
    seeds: tuple


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: its store key, model config and seed, and the notebooks that read it."""

    key: str
    model_config: ModelConfig
    seed: int
    notebooks: tuple = ()

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.model_config.label, "seed": self.seed,
                "notebooks": list(self.notebooks), "model_config": self.model_config.to_dict()}


def plan_runs(requests: Iterable, profile: str | Profile, dataset) -> list[PlannedRun]:
    """The distinct runs of ``requests`` ((notebook, RunRequest) pairs, or bare RunRequests) for a
    profile and a loaded dataset, in request order; a run several notebooks share appears once."""
    profile = get_profile(profile)
    identity, classes = dataset_identity(dataset), len(dataset.classes)
    runs: dict[str, PlannedRun] = {}
    for item in requests:
        notebook, request = item if isinstance(item, tuple) else (None, item)
        config = model_config_for(request.overrides, profile, classes)
        for seed in request.seeds:
            key = run_key(config, profile, identity, seed)
            known = runs.get(key)
            notebooks = (known.notebooks if known else ()) + ((notebook,) if notebook else ())
            runs[key] = PlannedRun(key, config, seed, tuple(dict.fromkeys(notebooks)))
    return list(runs.values())


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(model_config: ModelConfig, profile: Profile, dataset_identity: dict, seed: int) -> str:
    payload = {"model": model_config.to_dict(), "profile": {**profile.to_dict(), "seeds": None},
               "dataset": dataset_identity, "seed": seed, "version": RECORD_VERSION}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def dataset_identity(dataset) -> dict:
    return {"name": dataset.name, "train_size": len(dataset.train_labels), "test_size": len(dataset.test_labels),
            "classes": len(dataset.classes)}


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _git_commit() -> str:
    from .reports import git_commit

    return git_commit()


class ResultsStore:
    """Run records in ``results_dir`` (JSON), weights and checkpoints in ``runs_dir``."""

    def __init__(self, results_dir: Path | None = None, runs_dir: Path | None = None) -> None:
        self.results_dir = Path(results_dir or paths.RESULTS_DIR)
        self.runs_dir = Path(runs_dir or paths.RUNS_DIR)

    def record_path(self, key: str) -> Path:
        return self.results_dir / f"{key}.json"

    def run_dir(self, key: str) -> Path:
        return self.runs_dir / key

    def get(self, key: str) -> dict | None:
        """The record of run ``key``; None when missing or not a valid record (warned: then it is run again)."""
        path = self.record_path(key)
        return _read_record(path, key) if path.exists() else None

    def put(self, record: dict) -> None:
        write_json_atomic(self.record_path(record["key"]), record)

    def records(self) -> list[dict]:
        """Every valid record; a file that is not one is skipped with a warning naming it."""
        records = (_read_record(p, p.stem) for p in sorted(self.results_dir.glob("*.json")))
        return [r for r in records if r is not None]


def record_problem(record) -> str | None:
    """What makes ``record`` unfit for a table (None: nothing). Finished runs must carry their numbers."""
    if not isinstance(record, dict):
        return f"got {type(record).__name__}; allowed: a JSON object"
    missing = [k for k in ("key", "status", "seed", "model_config", "dataset") if k not in record]
    if missing:
        return f"missing field(s) {missing}"
    if record["status"] not in STATUSES:
        return f"status: got {record['status']!r}; allowed values are {STATUSES}"
    if not isinstance(record["dataset"], dict) or "name" not in record["dataset"]:
        return f"dataset: got {record['dataset']!r}; allowed: an object with a name"
    try:
        ModelConfig.from_dict(record["model_config"])
    except (TypeError, ValueError) as error:
        return f"model_config: {error}"
    if record["status"] != "finished":
        return None
    if not isinstance(record.get("history"), list) or not record["history"]:
        return "history: a finished run needs its per-epoch records"
    for name in ("clean_accuracy", "mean_corruption_accuracy"):
        value = record.get(name)
        if not (value is None and name == "mean_corruption_accuracy") and not (
                is_number(value) and 0.0 <= value <= 1.0):
            return f"{name}: got {value!r}; allowed: a number in [0, 1]"
    value = record.get("train_seconds")
    if value is not None and not (is_number(value) and math.isfinite(value) and value >= 0):
        return f"train_seconds: got {value!r}; allowed: a number >= 0"
    if not isinstance(record.get("costs") or {}, dict):
        return f"costs: got {record['costs']!r}; allowed: an object"
    return None


def _read_record(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        problem = record_problem(record)
        if problem is None and record["key"] != key:
            problem = f"key: got {record['key']!r} in the file of run {key!r}"
    if problem is None:
        return record
    warnings.warn(f"results store: skipping {path}: {problem}. It enters no table; a notebook that needs this "
                  "run trains it again (delete the file to silence this warning)", BadRecordWarning, stacklevel=3)
    return None


def valid_records(records: Iterable[dict]) -> list[dict]:
    """``records`` without those unfit for a table, each left out with a warning naming it."""
    kept = []
    for r in records:
        problem = record_problem(r)
        if problem is None:
            kept.append(r)
        else:
            name = r.get("key") if isinstance(r, dict) else None
            warnings.warn(f"run record {name or r!r} left out of the tables: {problem}", BadRecordWarning,
                          stacklevel=3)
    return kept


def load_profile_dataset(profile: Profile, dataset: str = "auto", seed: int = 0):
    from .data import load_dataset

    return load_dataset(dataset, train_size=profile.train_size, test_size=profile.test_size, seed=seed)


def evaluate_corruptions(model, dataset, profile: Profile, device) -> dict[str, dict[str, float]]:
    """Accuracy per corruption and severity (CIFAR-10-C protocol) on the profile's corruption test set."""
    from .corruptions import CORRUPTIONS, load_corrupted_test_set

    results: dict[str, dict[str, float]] = {}
    for corruption in profile.corruptions or CORRUPTIONS:
        results[corruption] = {}
        for severity in profile.severities:
            images, labels = load_corrupted_test_set(dataset, corruption, severity,
                                                     size=profile.corruption_test_size)
            acc = evaluate(model, images, labels, dataset.mean, dataset.std, profile.train.eval_batch_size,
                           device)["accuracy"]
            results[corruption][str(severity)] = acc
    return results


COSTS_VERSION = 2  # 2: multiply-adds and FLOPs include the modules that run in C kernels


def measure_config_costs(model_config: ModelConfig, profile: Profile, store: ResultsStore) -> dict:
    """Parameters, multiply-adds, FLOPs, memory and speed of a config (measured once, cached)."""
    from .measure import measure_costs

    key = hashlib.sha256(_canonical({"model": model_config.to_dict(), "input": profile.cost_input_size,
                                     "threads": torch.get_num_threads(), "version": COSTS_VERSION,
                                     "batch": profile.cost_train_batch or profile.train.batch_size,
                                     "repeats": profile.cost_repeats}
                                    ).encode()).hexdigest()[:16]
    path = store.results_dir / "costs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    size = profile.cost_input_size
    report = measure_costs(lambda: build_model(model_config), input_size=(model_config.in_channels, size, size),
                           num_classes=model_config.num_classes, device="cpu",
                           train_batch=profile.cost_train_batch or profile.train.batch_size,
                           repeats=profile.cost_repeats).to_dict()
    report["measured"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(path, report)
    return report


def run_experiment(model_config: ModelConfig, profile: str | Profile, dataset, seed: int,
                   store: ResultsStore | None = None, show_progress: bool = True,
                   stop_after_epoch: int | None = None) -> dict:
    """Train, evaluate (clean and corrupted) and record one run; a finished run is read back, not redone.

    A per-run file lock makes a second process that asks for the same run wait and read the
    first one's record instead of training it again. Inside a torch.distributed process group
    (torchrun) every rank trains its share and rank 0 alone holds the lock and writes."""
    profile = get_profile(profile)
    store = store or ResultsStore()
    identity = dataset_identity(dataset)
    key = run_key(model_config, profile, identity, seed)
    if distributed_context()[1] > 1:
        return _run_distributed(model_config, profile, dataset, seed, store, key, identity, show_progress,
                                stop_after_epoch)
    done = _stored_run(store, key, model_config, profile)
    if done is not None:  # read without the lock: a read-only store keeps working
        return done
    lock = _acquire_run_lock(store, key, model_config, seed)
    try:
        done = _stored_run(store, key, model_config, profile)  # the other process may have finished it
        if done is not None:
            return done
        return _run_locked(model_config, profile, dataset, seed, store, key, identity, show_progress,
                           stop_after_epoch)
    finally:
        lock.release()


def _acquire_run_lock(store: ResultsStore, key: str, model_config: ModelConfig, seed: int):
    """The run's file lock, held (an OS lock: released when its process dies, even by SIGKILL)."""
    from filelock import FileLock, Timeout

    store.runs_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(store.runs_dir / f".{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[experiments] run {key} ({model_config.label}, seed {seed}) is being trained by another process; "
              "waiting for its result", flush=True)
        lock.acquire()
    return lock


def _run_distributed(model_config: ModelConfig, profile: Profile, dataset, seed: int, store: ResultsStore, key: str,
                     identity: dict, show_progress: bool, stop_after_epoch: int | None) -> dict:
    """One run trained by every rank of the process group; rank 0 holds the lock, evaluates the
    corruptions and writes the record and weights; every rank returns rank 0's record."""
    import torch.distributed as dist

    rank = dist.get_rank()
    lock, decided = None, [None]
    if rank == 0:
        decided[0] = _stored_run(store, key, model_config, profile)
        if decided[0] is None:
            lock = _acquire_run_lock(store, key, model_config, seed)
            decided[0] = _stored_run(store, key, model_config, profile)
    dist.broadcast_object_list(decided, src=0)
    if decided[0] is not None:
        if lock is not None:
            lock.release()
        return decided[0]
    try:
        record = _run_locked(model_config, profile, dataset, seed, store, key, identity, show_progress and rank == 0,
                             stop_after_epoch, writer=rank == 0)
    finally:
        if lock is not None:
            lock.release()
    result = [record]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _stored_run(store: ResultsStore, key: str, model_config: ModelConfig, profile: Profile) -> dict | None:
    existing = store.get(key)
    if existing is None or existing["status"] not in ("finished", "failed"):
        return None
    if existing["status"] == "finished":  # costs belong to the config and machine: the current ones
        existing["costs"] = measure_config_costs(model_config, profile, store)
    return existing


def _run_locked(model_config: ModelConfig, profile: Profile, dataset, seed: int, store: ResultsStore, key: str,
                identity: dict, show_progress: bool, stop_after_epoch: int | None, writer: bool = True) -> dict:
    """Train and record run ``key`` while holding its lock (``writer``: this process writes; False for
    the ranks > 0 of a distributed run, which only train)."""
    allocator = keep_freed_memory()  # training steps without page faults (see mnv2lib.allocator)
    run_dir = store.run_dir(key)
    if writer and run_dir.is_dir():  # temporary files of a writer killed mid-write (we hold the lock)
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    record = {
        "key": key, "version": RECORD_VERSION, "status": "running", "model_config": model_config.to_dict(),
        "label": model_config.label, "profile": profile.to_dict(), "profile_name": profile.name,
        "dataset": {**identity, "description": dataset.description}, "seed": seed,
        "started": _dt.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "allocator": allocator,
        "machine": platform.machine(),
    }
    if distributed_context()[1] > 1:
        record["world_size"] = distributed_context()[1]
    checkpoint = run_dir / "checkpoint.pt"
    for attempt in range(2):
        torch.manual_seed(seed)  # the initial weights belong to the run, not to whatever ran before it
        model = build_model(model_config)
        try:
            result = train_model(model, dataset, profile.train, seed=seed, checkpoint_path=checkpoint,
                                 show_progress=show_progress, stop_after_epoch=stop_after_epoch)
            break
        except CheckpointError as error:  # resuming it would fail the same way forever: start again
            if attempt or not writer:
                raise
            aside = checkpoint.with_name(checkpoint.name + ".corrupt")
            os.replace(checkpoint, aside)
            warnings.warn(f"{error}. Moved it to {aside}; training run {key} from the start", stacklevel=2)
        except NonFiniteLossError as error:  # NaN/Inf or a diverged loss: recorded, never in a table
            record.update(status="failed", error=str(error),
                          finished=_dt.datetime.now().isoformat(timespec="seconds"))
            if writer:
                store.put(record)
            return record
    if len(result.history) < profile.train.epochs:  # stopped early on purpose: resumable, not finished
        return {**record, "history": result.history}
    if not writer:  # a rank > 0 of a distributed run: rank 0 evaluates and records
        return {**record, "history": result.history}
    device = resolve_device(profile.train.device)
    save_atomic(model.state_dict(), run_dir / "model.pt")
    t0 = time.perf_counter()
    corruption = evaluate_corruptions(model, dataset, profile, device)
    flat = [acc for per in corruption.values() for acc in per.values()]
    record.update(
        status="finished", history=result.history, train_seconds=result.seconds, device=result.device,
        resumed_from_epoch=result.resumed_from_epoch,
        clean_accuracy=result.history[-1]["test_accuracy"], corruption_accuracy=corruption,
        mean_corruption_accuracy=statistics.fmean(flat) if flat else None,
        corruption_eval_seconds=time.perf_counter() - t0,
        costs=measure_config_costs(model_config, profile, store),
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
    )
    store.put(record)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


def load_trained_model(record: dict, store: ResultsStore | None = None, device: str = "cpu"):
    """The trained model of a finished run, in eval mode."""
    store = store or ResultsStore()
    model = build_model(ModelConfig.from_dict(record["model_config"]))
    path = store.run_dir(record["key"]) / "model.pt"
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except Exception as error:  # missing, truncated, not a state dict, another architecture's
        raise CorruptRunError(
            f"model weights {path} of run {record['key']} ({record.get('label')}) cannot be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); delete {store.record_path(record['key'])} "
            "to train the run again (trained_model() does so itself)") from None
    return model.to(device).eval()


def _wall_seconds(record: dict) -> float | None:
    """Start to finish of a run as recorded (training, corruption evaluation, cost measurement)."""
    if not (record.get("started") and record.get("finished")):
        return None
    return (_dt.datetime.fromisoformat(record["finished"]) - _dt.datetime.fromisoformat(record["started"])).total_seconds()


def records_to_frame(records: Iterable[dict]):
    """A tidy DataFrame: one row per run, the headline numbers as columns."""
    import pandas as pd

    rows = []
    for r in valid_records(records):
        costs = r.get("costs") or {}
        rows.append({
            "key": r["key"], "label": r.get("label"), "status": r["status"], "seed": r["seed"],
            "profile": r.get("profile_name"), "dataset": r["dataset"]["name"],
            "dataset_description": r["dataset"].get("description"),
            "activation": r["model_config"]["activation"], "attention": r["model_config"]["attention"],
            "cnsn": r["model_config"]["cnsn"], "arch": r["model_config"]["arch"],
            "clean_accuracy": r.get("clean_accuracy"), "mean_corruption_accuracy": r.get("mean_corruption_accuracy"),
            "train_seconds": r.get("train_seconds"), "parameters": costs.get("parameters"),
            "multiply_adds": costs.get("multiply_adds"), "flops": costs.get("flops"),
            "train_memory_MiB": (costs.get("train_memory_bytes") or 0) / 2**20 or None,
            "train_images_per_s": costs.get("train_images_per_s"),
            "latency_ms_batch1": costs.get("latency_ms_batch1"), "latency_ms_batch64": costs.get("latency_ms_batch64"),
            "wall_seconds": _wall_seconds(r),
        })
    return pd.DataFrame(rows)


def load_results(store: ResultsStore | None = None, status: str | None = "finished"):
    """Every record in the store as a DataFrame (failed runs carry no numbers)."""
    store = store or ResultsStore()
    records = [r for r in store.records() if status is None or r["status"] == status]
    return records_to_frame(records)


def run_grid(overrides_list: list[dict], profile: str | Profile = "quick", dataset="auto", seeds=None,
             store: ResultsStore | None = None, show_progress: bool = True):
    """Every config x seed; runs only what the store does not have. Returns the tidy DataFrame."""
    return records_to_frame(ensure_runs(overrides_list, profile, dataset, seeds, store, show_progress))


def ensure_runs(overrides_list: list[dict], profile: str | Profile = "quick", dataset="auto", seeds=None,
                store: ResultsStore | None = None, show_progress: bool = True) -> list[dict]:
    """The records of every config x seed, running only the missing ones (in this order)."""
    profile = get_profile(profile)
    store = store or ResultsStore()
    if isinstance(dataset, str):
        dataset = load_profile_dataset(profile, dataset)
    seeds = tuple(seeds if seeds is not None else profile.seeds)
    jobs = [(model_config_for(o, profile, len(dataset.classes)), s) for o in overrides_list for s in seeds]
    records = []
    for config, seed in progress(jobs, enabled=show_progress, desc="runs", unit="run"):
        records.append(run_experiment(config, profile, dataset, seed, store, show_progress=False))
    return records


def trained_model(overrides: dict, profile: str | Profile = "quick", dataset="auto", seed: int = 0,
                  store: ResultsStore | None = None, show_progress: bool = True):
    """(model in eval mode, record) for a config of the profile: read from the store, trained if missing.

    The same (config, profile, dataset, seed) is the same run in every notebook, so a model
    trained for one notebook is reused by the others and by the ablation grid.
    """
    profile = get_profile(profile)
    store = store or ResultsStore()
    if isinstance(dataset, str):
        dataset = load_profile_dataset(profile, dataset)
    config = model_config_for(overrides, profile, len(dataset.classes))
    record = run_experiment(config, profile, dataset, seed, store, show_progress=show_progress)
    if record["status"] != "finished":
        raise RuntimeError(f"run {record['key']} ({config.label}) did not finish: {record.get('error')}")
    try:
        return load_trained_model(record, store), record
    except CorruptRunError as error:  # the weights are gone or damaged: the run is trained again
        weights = store.run_dir(record["key"]) / "model.pt"
        if weights.exists():
            os.replace(weights, weights.with_name(weights.name + ".corrupt"))
        store.record_path(record["key"]).unlink(missing_ok=True)
        warnings.warn(f"{error}; training it again", stacklevel=2)
        record = run_experiment(config, profile, dataset, seed, store, show_progress=show_progress)
        return load_trained_model(record, store), record


def finished(records: list[dict]) -> list[dict]:
    """Only the finished runs; a failed run (non-finite loss) never enters a results table."""
    records = valid_records(records)
    dropped = [r for r in records if r["status"] != "finished"]
    for r in dropped:
        print(f"[experiments] run {r['key']} ({r.get('label')}, seed {r['seed']}) is {r['status']}: "
              f"{r.get('error', '')}; left out of the tables")
    return [r for r in records if r["status"] == "finished"]


LADDER_CONFIGS = [{}] + list(IMPROVEMENTS.values())  # the baseline and each improvement alone


def train_ladder(dataset: str = "auto", factors=LADDER_FACTORS, store: ResultsStore | None = None,
                 show_progress: bool = True) -> list[dict]:
    """The budget ladder's runs: the quick rung (its seeds) and each ``quick_x<factor>`` rung (one seed),
    for the baseline and each single improvement; only what the store lacks is trained."""
    records = ensure_runs(LADDER_CONFIGS, "quick", dataset, store=store, show_progress=show_progress)
    for factor in factors:
        records += ensure_runs(LADDER_CONFIGS, budget_rung(PROFILES["quick"], factor), dataset, store=store,
                               show_progress=show_progress)
    return records


def ladder_records(records: Iterable[dict], dataset_name: str | None = None) -> list[dict]:
    """The finished runs that belong on the budget ladder: the baseline or one improvement alone, with the
    default settings of their profile (so that a design study's runs never pose as a rung), from any known
    profile (the GPU profile's runs are the top rung)."""
    out = []
    for r in records:
        profile = PROFILES.get(r.get("profile_name"))
        if r.get("status") != "finished" or profile is None or r.get("model_config") is None:
            continue
        if dataset_name is not None and r["dataset"]["name"] != dataset_name:
            continue
        classes = r["model_config"].get("num_classes")
        if any(model_config_for(o, profile, classes).to_dict() == r["model_config"] for o in LADDER_CONFIGS):
            out.append(r)
    return out


def _print_runs(records: list[dict]) -> None:
    for r in finished(records):
        print(f"{r['profile_name']:10s} {r['label']:18s} seed {r['seed']}  clean {100 * r['clean_accuracy']:5.1f}%  "
              f"corruption {100 * (r.get('mean_corruption_accuracy') or float('nan')):5.1f}%  "
              f"train {r.get('train_seconds', float('nan')):7.1f} s  wall {_wall_seconds(r) or float('nan'):7.1f} s  "
              f"on {r.get('device')}", flush=True)


def _grid_options(parser) -> None:
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--dataset", default="auto", help="auto | cifar10 | cifar100 | synthetic | <ImageFolder path>")
    parser.add_argument("--seed", type=int, default=0, help="the notebooks' seed parameter (notebooks 01-03)")
    parser.add_argument("--notebooks", nargs="*", help="only the runs of these notebooks (default: all)")


def _run_options(parser) -> None:
    parser.add_argument("--executor", default=None, help="local (default; or $MNV2_EXECUTOR) | ray")
    parser.add_argument("--address", default=None, help="Ray cluster to connect to (default: $RAY_ADDRESS, else "
                                                        "a local cluster of workers x threads CPUs)")
    parser.add_argument("--workers", type=int, default=None, help="runs side by side (ray; default: cores / threads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's "
                                                                  "here, 1 per Ray task)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task requests (e.g. 1)")


def plan_notebook_runs(profile: str, dataset: str = "auto", seed: int = 0, notebooks=None):
    """(loaded dataset, planned runs) of the notebooks' requests (``mnv2lib.notebook_plan``)."""
    from .notebook_plan import requests_for  # the notebooks' layer: imported by the command line only

    requests = requests_for(profile, seed, notebooks)
    loaded = load_profile_dataset(get_profile(profile), dataset, seed=0)  # as workbook.Session loads it
    return loaded, plan_runs(requests, profile, loaded)


def train_plan(profile: str, dataset: str = "auto", seed: int = 0, notebooks=None, store: ResultsStore | None = None,
               show_progress: bool = True, **executor_options) -> list[dict]:
    """Train every run the notebooks will ask for that the store lacks (``mnv2lib.executors``)."""
    from .executors import train_runs

    loaded, runs = plan_notebook_runs(profile, dataset, seed, notebooks)
    return train_runs(runs, profile, loaded, store, show_progress=show_progress, **executor_options)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mnv2lib.experiments",
                                     description="Train experiment runs into the results store.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the runs the notebooks need (key, status, config), training nothing")
    _grid_options(plan)
    plan.add_argument("--json", action="store_true", help="one JSON object per run")
    run = sub.add_parser("run", help="train the runs of the plan that the store lacks (--executor local|ray)")
    _grid_options(run)
    _run_options(run)
    train = sub.add_parser("train", help="train one run; under `torchrun --nproc_per_node=N` with "
                                         "DistributedDataParallel")
    train.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    train.add_argument("--dataset", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", default="{}", help='build_model overrides as JSON, e.g. \'{"activation": "mish"}\'')
    ablation = sub.add_parser("ablation", help="the 2^3 ablation of a profile (e.g. --profile gpu on a GPU machine)")
    ablation.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ablation.add_argument("--dataset", default="auto")
    ablation.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    ladder = sub.add_parser("ladder", help="the budget ladder: quick, 2x and 4x for the baseline and each "
                                           "improvement alone (notebook 04 reads them)")
    ladder.add_argument("--dataset", default="auto")
    ladder.add_argument("--factors", default=",".join(map(str, LADDER_FACTORS)),
                        help="budget multiples of the quick profile (comma-separated integers)")
    args = parser.parse_args(argv)

    def integers(field: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(f) for f in text.split(",") if f)
        except ValueError:
            parser.error(f"{field}: got {text!r}; allowed: comma-separated integers such as 0,1")

    try:
        if args.command == "plan":
            _print_plan(*plan_notebook_runs(args.profile, args.dataset, args.seed, args.notebooks), args.json)
        elif args.command == "run":
            from .executors import check_options

            check_options(args.executor, args.address, args.workers, args.threads)  # before the data loads
            _print_runs(train_plan(args.profile, args.dataset, args.seed, args.notebooks, executor=args.executor,
                                   address=args.address, workers=args.workers, threads=args.threads,
                                   gpus_per_run=args.gpus_per_run))
        elif args.command == "train":
            _train_one(args.profile, args.dataset, args.seed, args.config)
        elif args.command == "ablation":
            seeds = integers("--seeds", args.seeds) if args.seeds else None
            _print_runs(ensure_runs(ablation_configs(), args.profile, args.dataset, seeds))
        else:
            _print_runs(train_ladder(args.dataset, integers("--factors", args.factors)))
    except ValueError as error:
        parser.error(str(error))  # exit status 2, naming the field


def _print_plan(dataset, runs: list[PlannedRun], as_json: bool) -> None:
    store = ResultsStore()
    for run in runs:
        record = store.get(run.key)
        status = record["status"] if record else "missing"
        if as_json:
            print(json.dumps({**run.to_dict(), "status": status}), flush=True)
        else:
            print(f"{run.key}  {status:8s}  {run.model_config.label:24s} seed {run.seed}  "
                  f"{','.join(n[:2] for n in run.notebooks):9s} {_canonical(run.model_config.to_dict())}", flush=True)
    if not as_json:
        missing = sum(1 for r in runs if (store.get(r.key) or {}).get("status") not in ("finished", "failed"))
        print(f"{len(runs)} runs on {dataset.description}; {missing} to train", flush=True)


def _train_one(profile: str, dataset: str, seed: int, config_json: str) -> None:
    """One run; under torchrun every rank trains its share (DistributedDataParallel) and rank 0 records."""
    from .train import init_distributed

    try:
        overrides = json.loads(config_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config: got {config_json!r} ({error}); allowed: a JSON object of build_model "
                         "overrides") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config: got {config_json!r}; allowed: a JSON object of build_model overrides")
    rank, world = init_distributed()
    profile_ = get_profile(profile)
    loaded = load_profile_dataset(profile_, dataset, seed=0)
    record = run_experiment(model_config_for(overrides, profile_, len(loaded.classes)), profile_, loaded, seed,
                            show_progress=rank == 0)
    if rank == 0:
        _print_runs([record])
        if world > 1:
            print(f"[experiments] trained on {world} processes (DistributedDataParallel)", flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
