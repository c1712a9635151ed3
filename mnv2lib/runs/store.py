"""The results store: one JSON record per run in ``reports/results/<key>.json``, written atomically;
weights and checkpoints in ``reports/runs/<key>/``. Reading it never trains anything."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

from ..models import ModelConfig
from ..utils import paths
from ..utils.checks import is_number
from ..utils.io import write_json_atomic

STATUSES = ("running", "finished", "failed")


class BadRecordWarning(UserWarning):
    """A file in the results store is not a valid run record; it is skipped (and the run redone when needed)."""


class CorruptRunError(ValueError):
    """A finished run's weights file cannot be loaded; the message names the file."""


class StoreLocationError(ValueError):
    """A folder of the results store is a regular file or lies under one (``MNV2_REPORTS_DIR`` naming a file)."""


def _check_folder(path: Path, from_environment: bool) -> None:
    """``path`` is a folder or can be made one: else every lookup would read "missing" and every write fail."""
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return
            if from_environment:
                raise StoreLocationError(
                    f"{paths.REPORTS_ENV_VAR}: got {os.environ[paths.REPORTS_ENV_VAR]!r}; {folder} is a regular file, "
                    "not a folder; allowed: a folder (made if missing) for the reports and the results store")
            raise StoreLocationError(f"results store: {path} lies under the regular file {folder}; allowed: a folder "
                                     "(made if missing)")


class ResultsStore:
    """Run records in ``results_dir`` (JSON), weights and checkpoints in ``runs_dir``."""

    def __init__(self, results_dir: Path | None = None, runs_dir: Path | None = None) -> None:
        self.results_dir = Path(results_dir or paths.RESULTS_DIR)
        self.runs_dir = Path(runs_dir or paths.RUNS_DIR)
        from_environment = bool(os.environ.get(paths.REPORTS_ENV_VAR))
        _check_folder(self.results_dir, from_environment and not results_dir)
        _check_folder(self.runs_dir, from_environment and not runs_dir)

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


def results_table(records: Iterable[dict]):
    """One row per run for tools that read tables (timm's results CSVs): the key, every model config field
    (``config.<field>``), profile, dataset, seed, status, clean and mean corruption accuracy, the accuracy
    of every corruption (mean over its severities, ``corruption.<name>``), the costs, training time and the
    git commit the run was trained at. Records are sorted by profile, label and seed."""
    import pandas as pd

    rows = []
    for r in valid_records(records):
        costs = r.get("costs") or {}
        row = {"key": r["key"], "label": r.get("label"), "profile": r.get("profile_name"),
               "dataset": r["dataset"]["name"], "train_size": r["dataset"].get("train_size"), "seed": r["seed"],
               "status": r["status"], "clean_accuracy": r.get("clean_accuracy"),
               "mean_corruption_accuracy": r.get("mean_corruption_accuracy")}
        row.update({f"config.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v
                    for k, v in r["model_config"].items()})
        for corruption, per_severity in sorted((r.get("corruption_accuracy") or {}).items()):
            values = [v for v in per_severity.values() if v is not None]
            row[f"corruption.{corruption}"] = sum(values) / len(values) if values else None
        row.update({"parameters": costs.get("parameters"), "multiply_adds": costs.get("multiply_adds"),
                    "train_seconds": r.get("train_seconds"), "wall_seconds": _wall_seconds(r),
                    "train_images_per_s": costs.get("train_images_per_s"),
                    "latency_ms_batch1": costs.get("latency_ms_batch1"),
                    "latency_ms_batch64": costs.get("latency_ms_batch64"), "epochs": len(r.get("history") or []),
                    "device": r.get("device"), "torch": r.get("torch"), "git_commit": r.get("git_commit"),
                    "finished": r.get("finished")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["profile", "label", "seed"], kind="stable", ignore_index=True) if rows else frame


def write_learning_curve(record: dict, store: "ResultsStore") -> Path | None:
    """``runs/<key>/history.csv``: the run's per-epoch records (and its learning curve points when it has
    them), beside its weights; None for a run without history."""
    import pandas as pd

    rows = [{"kind": "epoch", **h} for h in record.get("history") or []]
    rows += [{"kind": "curve", **c} for c in record.get("curve") or []]
    if not rows:
        return None
    path = store.run_dir(record["key"]) / "history.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def export_results(store: "ResultsStore | None" = None, path: Path | None = None) -> Path:
    """Write :func:`results_table` of every record in the store to ``path`` (default ``reports/results.csv``,
    beside the results index) and each finished run's ``history.csv``; returns the CSV's path."""
    store = store or ResultsStore()
    records = store.records()
    path = Path(path or paths.REPORTS_DIR / "results.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    results_table(records).to_csv(tmp, index=False)
    os.replace(tmp, path)
    for r in records:
        if r["status"] == "finished":
            write_learning_curve(r, store)
    return path


def load_results(store: ResultsStore | None = None, status: str | None = "finished"):
    """Every record in the store as a DataFrame (failed runs carry no numbers)."""
    store = store or ResultsStore()
    records = [r for r in store.records() if status is None or r["status"] == status]
    return records_to_frame(records)



def finished(records: list[dict]) -> list[dict]:
    """Only the finished runs; a failed run (non-finite loss) never enters a results table."""
    records = valid_records(records)
    dropped = [r for r in records if r["status"] != "finished"]
    for r in dropped:
        print(f"[experiments] run {r['key']} ({r.get('label')}, seed {r['seed']}) is {r['status']}: "
              f"{r.get('error', '')}; left out of the tables")
    return [r for r in records if r["status"] == "finished"]

