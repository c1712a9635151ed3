"""Running one run: train, evaluate (clean and corrupted), measure its costs and record it, under a
per-run file lock; a finished run is read back, never redone. Runs checkpoint every epoch: killing the
process loses at most the current epoch."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import time
import warnings

import torch

from ..engine.corruptions import IMAGE_SIZE as CORRUPTION_IMAGE_SIZE
from ..engine.corruptions import check_dataset_images, evaluate_corruptions
from ..engine.train import CheckpointError, NonFiniteLossError, distributed_context, resolve_device, train_model
from ..models import ModelConfig, build_model
from ..utils.allocator import keep_freed_memory
from ..utils.io import save_atomic, write_json_atomic
from ..utils.provenance import git_commit
from .profiles import Profile, get_profile
from .spec import RECORD_VERSION, _canonical, check_seed, dataset_identity, run_key
from .store import CorruptRunError, ResultsStore, write_learning_curve


def load_profile_dataset(profile: Profile, dataset: str = "auto", seed: int = 0):
    from ..engine.data import load_dataset, split_validation

    # the profiles train and evaluate 32x32 images (CIFAR-10-C's parameters are for that size): another
    # size is resized, and says so in the dataset's name and description (so in the run key)
    extra = profile.validation_size if profile.train_size else 0  # with every image loaded there are none left
    try:
        loaded = load_dataset(dataset, train_size=profile.train_size + extra if extra else profile.train_size,
                              test_size=profile.test_size, seed=seed, image_size=CORRUPTION_IMAGE_SIZE)
    except ValueError as error:
        if not (extra and str(error).startswith("train_size")):
            raise
        raise ValueError(f"validation_size: profile {profile.name!r} holds {extra} training images out for its "
                         f"learning curves beside its {profile.train_size} training images, more than {dataset!r} "
                         f"has ({error}); allowed: a smaller train_size or validation_size") from None
    return split_validation(loaded, profile.train_size) if extra else loaded



COSTS_VERSION = 3  # 2: multiply-adds and FLOPs include the modules that run in C kernels; 3: also in a fresh process


def measure_config_costs(model_config: ModelConfig, profile: Profile, store: ResultsStore) -> dict:
    """Parameters, multiply-adds, FLOPs, memory and speed of a config (measured once, cached)."""
    from ..engine.measure import measure_costs

    key = hashlib.sha256(_canonical({"model": model_config.to_dict(), "input": profile.cost_input_size,
                                     "threads": torch.get_num_threads(), "version": COSTS_VERSION,
                                     "batch": profile.cost_train_batch or profile.train.batch_size,
                                     "repeats": profile.cost_repeats}
                                    ).encode()).hexdigest()[:16]
    path = store.results_dir / "costs" / f"{key}.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            cached = error
        if isinstance(cached, dict):
            return cached
        # a truncated or foreign cache file is a cache miss: measured again and replaced atomically
        problem = f"{type(cached).__name__}: {cached}" if isinstance(cached, Exception) else "not a JSON object"
        warnings.warn(f"cost cache {path} is unreadable ({problem}); measuring the costs again", stacklevel=2)
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
                   stop_after_epoch: int | None = None, measure_costs: bool = True) -> dict:
    """Train, evaluate (clean and corrupted) and record one run; a finished run is read back, not redone.
    ``measure_costs=False``: record no costs (a run trained beside others must not time anything; whoever
    reads the record measures them alone, see :func:`_stored_run`).

    A per-run file lock makes a second process that asks for the same run wait and read the
    first one's record instead of training it again. Inside a torch.distributed process group
    (torchrun) every rank trains its share and rank 0 alone holds the lock and writes."""
    profile = get_profile(profile)
    seed = check_seed(seed)  # the record stores it: 0, never np.int64(0) written as "0"
    check_dataset_images(dataset)  # before training, not after it: the corruption evaluation needs 32x32
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
                           stop_after_epoch, measure_costs=measure_costs)
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


def _started_record(model_config: ModelConfig, profile: Profile, dataset, seed: int, key: str, identity: dict) -> dict:
    """A run's record as training starts: what it is, and where and with what it was trained."""
    allocator = keep_freed_memory()  # training steps without page faults (see mnv2lib.utils.allocator)
    record = {
        "key": key, "version": RECORD_VERSION, "status": "running", "model_config": model_config.to_dict(),
        "label": model_config.label, "profile": profile.to_dict(), "profile_name": profile.name,
        "dataset": {**identity, "description": dataset.description}, "seed": seed,
        "started": _dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "allocator": allocator,
        "machine": platform.machine(),
    }
    if distributed_context()[1] > 1:
        record["world_size"] = distributed_context()[1]
    return record


def _run_locked(model_config: ModelConfig, profile: Profile, dataset, seed: int, store: ResultsStore, key: str,
                identity: dict, show_progress: bool, stop_after_epoch: int | None, writer: bool = True,
                measure_costs: bool = True) -> dict:
    """Train and record run ``key`` while holding its lock (``writer``: this process writes; False for
    the ranks > 0 of a distributed run, which only train)."""
    run_dir = store.run_dir(key)
    if writer and run_dir.is_dir():  # temporary files of a writer killed mid-write (we hold the lock)
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    record = _started_record(model_config, profile, dataset, seed, key, identity)
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
    corruption = evaluate_corruptions(model, dataset, profile.corruptions, profile.severities,
                                      profile.corruption_test_size, profile.train.eval_batch_size, device,
                                      profile.train.channels_last)
    flat = [acc for per in corruption.values() for acc in per.values()]
    record.update(
        status="finished", history=result.history, curve=result.curve, train_seconds=result.seconds,
        device=result.device,
        resumed_from_epoch=result.resumed_from_epoch,
        clean_accuracy=result.history[-1]["test_accuracy"], corruption_accuracy=corruption,
        mean_corruption_accuracy=statistics.fmean(flat) if flat else None,
        corruption_eval_seconds=time.perf_counter() - t0,
        costs=measure_config_costs(model_config, profile, store) if measure_costs else {},
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
    )
    store.put(record)
    write_learning_curve(record, store)
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

