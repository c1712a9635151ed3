"""The notebooks' API over the results store: ask for runs, get records or trained models; only what
the store lacks is trained, in this process."""
from __future__ import annotations

import os
import warnings
from typing import Iterable

from ..utils.progress import progress
from .executors import GridError, local_workers, train_runs
from .profiles import LADDER_FACTORS, PROFILES, Profile, budget_rung, get_profile
from .runner import load_profile_dataset, load_trained_model, run_experiment
from .spec import (IMPROVEMENTS, RunRequest, ablation_configs, check_seed, model_config_for, parse_factors,
                   plan_runs)
from .store import (CorruptRunError, ResultsStore, export_results, finished, load_results, records_to_frame,
                    results_table)

__all__ = ["ResultsStore", "ablation_configs", "ensure_runs", "export_results", "finished", "ladder_records",
           "load_results", "parse_factors", "records_to_frame", "results_table", "run_grid", "stored_runs",
           "train_ladder", "train_side_by_side", "trained_model"]


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
    seeds = tuple(map(check_seed, seeds if seeds is not None else profile.seeds))
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



LADDER_CONFIGS = [{}] + list(IMPROVEMENTS.values())  # the baseline and each improvement alone


def _planned(overrides_list: list[dict], profile, dataset, seeds):
    """(profile, loaded dataset, the runs of every config x seed): seeds None, the profile's."""
    profile = get_profile(profile)
    if isinstance(dataset, str):
        dataset = load_profile_dataset(profile, dataset)
    seeds = tuple(seeds if seeds is not None else profile.seeds)
    return profile, dataset, plan_runs([RunRequest(o, seeds) for o in overrides_list], profile, dataset)


def stored_runs(overrides_list: list[dict], profile: str | Profile = "quick", dataset="auto", seeds=None,
                store: ResultsStore | None = None) -> list[dict]:
    """The finished records of every config x seed that the store holds; nothing is trained (a study
    shows what an optional command such as ``make decomposition`` has trained, and says what it has not)."""
    store = store or ResultsStore()
    _, _, runs = _planned(overrides_list, profile, dataset, seeds)
    return finished([r for r in (store.get(run.key) for run in runs) if r is not None])


def train_side_by_side(overrides_list: list[dict], profile: str | Profile = "quick", dataset="auto", seeds=None,
                       store: ResultsStore | None = None, show_progress: bool = True,
                       workers: int | None = None) -> list[dict]:
    """The records of every config x seed; only what the store lacks is trained, side by side as ``make
    reports`` trains its plan (``workers``; None: one run per core on a CPU, one at a time on a GPU)."""
    profile, dataset, runs = _planned(overrides_list, profile, dataset, seeds)
    return train_runs(runs, profile, dataset, store or ResultsStore(),
                      workers=workers if workers is not None else local_workers(profile), show_progress=show_progress)


def train_ladder(dataset: str = "auto", factors=LADDER_FACTORS, store: ResultsStore | None = None,
                 show_progress: bool = True, workers: int | None = None) -> list[dict]:
    """The budget ladder's runs: the quick rung (its seeds) and each ``quick_x<factor>`` rung (one seed),
    for the baseline and each single improvement; only what the store lacks is trained, side by side as
    ``make reports`` trains its plan (``workers``; None: one run per core on a CPU, one at a time on a GPU)."""
    rungs = [PROFILES["quick"]] + [budget_rung(PROFILES["quick"], f) for f in factors]  # a bad factor: first
    store = store or ResultsStore()
    records, failures = [], []
    for rung in rungs:
        try:
            records += train_side_by_side(LADDER_CONFIGS, rung, dataset, rung.seeds, store, show_progress, workers)
        except GridError as error:  # a failed run (kept failed in the store) must not stop every later rung
            failures.append(f"{rung.name}: {error}")
            records += stored_runs(LADDER_CONFIGS, rung, dataset, rung.seeds, store)
    if failures:
        raise GridError("the ladder's rungs trained, except: " + " | ".join(failures))
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

