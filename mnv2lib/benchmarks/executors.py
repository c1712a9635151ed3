"""How the grid scales: ``python -m mnv2lib.benchmarks.executors threads|grid`` (a measurement, not a test).

``threads``: the wall time of ONE run of a profile with 1 and with 2 torch threads (local executor,
fresh stores), and from it the parallel fraction p of a run (Amdahl: t(n) = t(1) ((1 - p) + p / n)).
``grid``: the wall time of ``--runs`` ablation runs trained by the local executor (one run at a time,
``--threads`` threads) and by Ray (``--workers`` x 1 thread, local cluster start included), and the
ratio the ``threads`` measurement predicts for it. With both on file, a prediction for a machine of
``--cores`` cores. Results are merged into ``reports/grid_bench.json`` with the load average.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..runs.profiles import get_profile
from ..runs.runner import load_profile_dataset
from ..runs.spec import RunRequest, ablation_configs, plan_runs
from ..runs.store import ResultsStore
from ..utils import paths


def _profile(name: str, train_size: int | None):
    profile = get_profile(name)
    if train_size:
        profile = dataclasses.replace(profile, name=f"{name}_{train_size}", train_size=train_size)
    return profile


def _timed_grid(runs, profile, dataset, **options) -> float:
    from ..runs.executors import train_runs

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        train_runs(runs, profile, dataset, ResultsStore(Path(root) / "results", Path(root) / "runs"),
                   show_progress=False, **options)
        return time.perf_counter() - t0


def measure_threads(profile, dataset) -> dict:
    runs = plan_runs([RunRequest({}, (0,))], profile, dataset)
    seconds = {n: _timed_grid(runs, profile, dataset, executor="local", threads=n) for n in (1, 2)}
    speedup = seconds[1] / seconds[2]
    return {"run_seconds_1_thread": seconds[1], "run_seconds_2_threads": seconds[2], "speedup_2_threads": speedup,
            "parallel_fraction": 2 * (1 - 1 / speedup)}


def measure_grid(profile, dataset, runs: int, workers: int, threads: int) -> dict:
    planned = plan_runs([RunRequest(o, (0,)) for o in ablation_configs()[:runs]], profile, dataset)
    local = _timed_grid(planned, profile, dataset, executor="local", threads=threads)
    on_ray = _timed_grid(planned, profile, dataset, executor="ray", workers=workers, threads=1)
    return {"runs": len(planned), "local_seconds": local, "local_threads": threads, "ray_seconds": on_ray,
            "ray_workers": workers, "ray_over_local": on_ray / local}


def amdahl_seconds(one_thread: float, parallel_fraction: float, threads: int) -> float:
    return one_thread * ((1 - parallel_fraction) + parallel_fraction / threads)


def predict(threads: dict, runs: int, cores: int) -> dict:
    """Wall time of ``runs`` equal runs on ``cores`` cores: one run at a time on every core, or
    ``cores / t`` runs side by side with t threads each (memory-bandwidth contention ignored)."""
    t1, p = threads["run_seconds_1_thread"], threads["parallel_fraction"]
    out = {"cores": cores, "runs": runs, f"local_1x{cores}_seconds": runs * amdahl_seconds(t1, p, cores)}
    for t in (1, 2, 4):
        if cores % t == 0 and t < cores:
            out[f"ray_{cores // t}x{t}_seconds"] = math.ceil(runs / (cores // t)) * amdahl_seconds(t1, p, t)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnv2lib.benchmarks.executors", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("threads", "grid", "predict"))
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--dataset", default="auto")
    parser.add_argument("--train-size", type=int, default=None, help="fewer training images than the profile's")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--output", default=str(paths.REPORTS_DIR / "grid_bench.json"))
    args = parser.parse_args(argv)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    if args.what != "predict":
        profile = _profile(args.profile, args.train_size)
        dataset = load_profile_dataset(profile, args.dataset)
        load_before = os.getloadavg()
        measured = (measure_threads(profile, dataset) if args.what == "threads"
                    else measure_grid(profile, dataset, args.runs, args.workers, args.threads))
        results[args.what] = {**measured, "profile": profile.name, "dataset": dataset.description,
                              "train_images": len(dataset.train_labels), "cpus": os.cpu_count(),
                              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                              "measured": time.strftime("%Y-%m-%d %H:%M")}
    if "threads" in results:
        if "grid" in results:
            g = results["grid"]
            per_run = {n: amdahl_seconds(results["threads"]["run_seconds_1_thread"],
                                         results["threads"]["parallel_fraction"], n) for n in (1, g["local_threads"])}
            results["grid"]["predicted_ray_over_local"] = (math.ceil(g["runs"] / g["ray_workers"]) * per_run[1]) / (
                g["runs"] * per_run[g["local_threads"]])
        results["prediction"] = predict(results["threads"], args.runs, args.cores)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
