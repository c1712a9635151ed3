"""The command line of the results store: ``python -m mnv2lib.experiments
plan|run|train|ablation|ladder|decomposition``."""
from __future__ import annotations

import json
from pathlib import Path

from ..engine.data import check_dataset_name
from ..analysis import decomposition
from ..runs.api import ensure_runs, train_ladder, train_side_by_side
from ..runs.executors import GridError, check_options, local_workers
from ..runs.profiles import LADDER_FACTORS, PROFILES, budget_rung, check_device_for, get_profile
from ..runs.runner import load_profile_dataset, run_experiment
from ..runs.spec import PlannedRun, _canonical, ablation_configs, check_seed, model_config_for
from ..runs.store import ResultsStore, _wall_seconds, export_results, finished
from .plan import plan_notebook_runs, requests_for, train_plan
from .report import as_flag, fail


def check_notebook_names(parser, notebooks) -> None:
    """``--notebooks``: each name once (argparse's nargs="+" already refuses none)."""
    twice = sorted({n for n in notebooks or () if list(notebooks).count(n) > 1})
    if twice:
        parser.error(f"--notebooks: got {twice} more than once; allowed: each notebook once")


def _print_runs(records: list[dict]) -> None:
    for r in finished(records):
        print(f"{r['profile_name']:10s} {r['label']:18s} seed {r['seed']}  clean {100 * r['clean_accuracy']:5.1f}%  "
              f"corruption {100 * (r.get('mean_corruption_accuracy') or float('nan')):5.1f}%  "
              f"train {r.get('train_seconds', float('nan')):7.1f} s  wall {_wall_seconds(r) or float('nan'):7.1f} s  "
              f"on {r.get('device')}", flush=True)


def _factor_option(parser) -> None:
    parser.add_argument("--factors", default=None, help="the ablation's factors, comma-separated (default: "
                                                        "mish,triplet,cnsn; any registered activation or attention)")


def _grid_options(parser) -> None:
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--dataset", default="auto", help="auto | cifar10 | cifar100 | synthetic | <ImageFolder path>")
    parser.add_argument("--seed", type=int, default=0, help="the notebooks' seed parameter (notebooks 01-03)")
    parser.add_argument("--notebooks", nargs="+", help="only the runs of these notebooks (default: all)")


def _run_options(parser) -> None:
    parser.add_argument("--executor", default=None, help="local (default; or $MNV2_EXECUTOR) | ray")
    parser.add_argument("--address", default=None, help="Ray cluster to connect to (default: $RAY_ADDRESS, else "
                                                        "a local cluster of workers x threads CPUs)")
    parser.add_argument("--workers", type=int, default=None, help="runs side by side (default: one per core on a CPU, "
                                                                  "one at a time on a GPU; ray: cores / threads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's "
                                                                  "here, 1 per Ray task)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task requests (e.g. 1)")


def _allow_cpu_option(parser) -> None:
    parser.add_argument("--allow-cpu", action="store_true", help="train a GPU profile (gpu, full) on a machine "
                                                                 "without CUDA (hours to days)")


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mnv2lib.experiments",
                                     description="Train experiment runs into the results store.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the runs the notebooks need (key, status, config), training nothing")
    _grid_options(plan)
    _factor_option(plan)
    plan.add_argument("--json", action="store_true", help="one JSON object per run")
    run = sub.add_parser("run", help="train the runs of the plan that the store lacks (--executor local|ray)")
    _grid_options(run)
    _factor_option(run)
    _run_options(run)
    _allow_cpu_option(run)
    train = sub.add_parser("train", help="train one run; under `torchrun --nproc_per_node=N` with "
                                         "DistributedDataParallel")
    train.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    train.add_argument("--dataset", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", default="{}", help='build_model overrides as JSON, e.g. \'{"activation": "mish"}\'')
    _allow_cpu_option(train)
    ablation = sub.add_parser("ablation", help="the 2^k ablation of a profile (e.g. --profile gpu on a GPU machine)")
    ablation.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ablation.add_argument("--dataset", default="auto")
    ablation.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    _factor_option(ablation)
    _allow_cpu_option(ablation)
    ladder = sub.add_parser("ladder", help="the budget ladder: quick, 2x, 4x, 8x and 16x for the baseline and each "
                                           "improvement alone (notebook 04 reads them)")
    ladder.add_argument("--dataset", default="auto")
    ladder.add_argument("--factors", default=",".join(map(str, LADDER_FACTORS)),
                        help="budget multiples of the quick profile (comma-separated integers)")
    parts = sub.add_parser("decomposition", help="every part of notebook 04's decomposition (make reports trains "
                                                 "a few), the profile's seeds, side by side")
    parts.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parts.add_argument("--dataset", default="auto")
    _allow_cpu_option(parts)
    export = sub.add_parser("export", help="write the results store as one CSV (one row per run) and each run's "
                                           "history.csv beside its weights")
    export.add_argument("--output", default=None, help="the CSV's path (default: reports/results.csv)")
    return parser


def _integers(field: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(f) for f in text.split(",") if f)
    except ValueError:
        raise ValueError(f"{field}: got {text!r}; allowed: comma-separated integers such as 0,1") from None


def _checked(args) -> dict:
    """Every argument checked before any data loads or anything trains; what the command needs of them."""
    ResultsStore()  # MNV2_REPORTS_DIR naming a file
    if args.command == "export":
        if args.output is not None and Path(args.output).is_dir():
            raise ValueError(f"--output: got {args.output!r}, a folder; allowed: a file path such as results.csv")
        return {}
    check_dataset_name(args.dataset)
    if args.command in ("plan", "run"):
        requests_for(args.profile, args.seed, args.notebooks, args.factors)
    if args.command == "run":
        check_options(args.executor, args.address, args.workers, args.threads, args.gpus_per_run)
        check_device_for(args.profile, args.allow_cpu)
    elif args.command == "train":
        check_seed(args.seed)
        check_device_for(args.profile, args.allow_cpu, runs=1)
        return {"overrides": _config_overrides(args.config, get_profile(args.profile))}
    elif args.command == "ablation":
        seeds = _integers("--seeds", args.seeds) if args.seeds else get_profile(args.profile).seeds
        check_device_for(args.profile, args.allow_cpu, runs=len(ablation_configs(factors=args.factors)) * len(seeds))
        return {"seeds": seeds}
    elif args.command == "decomposition":
        plan = decomposition.every_part(decomposition.decomposition_plan(get_profile(args.profile)))
        check_device_for(args.profile, args.allow_cpu, runs=len(decomposition.part_configs(plan)) * len(plan["seeds"]))
        return {"plan": plan}
    elif args.command == "ladder":
        factors = _integers("--factors", args.factors)
        for factor in factors:
            budget_rung(PROFILES["quick"], factor)
        return {"factors": factors}
    return {}


def _execute(args, checked: dict) -> None:
    if args.command == "export":
        print(f"[experiments] wrote {export_results(ResultsStore(), args.output)}", flush=True)
    elif args.command == "plan":
        _print_plan(*plan_notebook_runs(args.profile, args.dataset, args.seed, args.notebooks, args.factors),
                    args.json)
    elif args.command == "run":
        workers = args.workers if args.workers is not None else local_workers(args.profile, args.executor)
        _print_runs(train_plan(args.profile, args.dataset, args.seed, args.notebooks, factors=args.factors,
                               executor=args.executor, address=args.address, workers=workers, threads=args.threads,
                               gpus_per_run=args.gpus_per_run))
    elif args.command == "train":
        _train_one(args.profile, args.dataset, args.seed, checked["overrides"])
    elif args.command == "ablation":
        _print_runs(ensure_runs(ablation_configs(factors=args.factors), args.profile, args.dataset, checked["seeds"]))
    elif args.command == "decomposition":
        plan = checked["plan"]
        _print_runs(train_side_by_side(decomposition.part_configs(plan), args.profile, args.dataset, plan["seeds"]))
    else:
        _print_runs(train_ladder(args.dataset, checked["factors"]))


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    check_notebook_names(parser, getattr(args, "notebooks", None))
    try:
        checked = _checked(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(as_flag(str(error)))  # exit status 2, naming the option
    try:  # failures of the work itself (a dataset, the store, a run): one line, exit status 1
        _execute(args, checked)
    except (ValueError, OSError, ImportError, GridError) as error:
        fail(parser.prog, error)


def _config_overrides(config_json: str, profile) -> dict:
    """``--config`` as build_model overrides, checked against ModelConfig's fields (before any loading)."""
    try:
        overrides = json.loads(config_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config: got {config_json!r} ({error}); allowed: a JSON object of build_model "
                         "overrides") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config: got {config_json!r}; allowed: a JSON object of build_model overrides")
    if "num_classes" in overrides:  # the dataset's class count would silently win
        raise ValueError(f"--config: got num_classes={overrides['num_classes']!r}; allowed: leave it out (a run's "
                         "num_classes is its dataset's class count)")
    try:
        model_config_for(overrides, profile, 10)  # every field and value, with a stand-in class count
    except ValueError as error:
        raise ValueError(f"--config: {error}") from None
    return overrides


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


def _train_one(profile: str, dataset: str, seed: int, overrides: dict) -> None:
    """One run; under torchrun every rank trains its share (DistributedDataParallel) and rank 0 records."""
    from ..engine.train import init_distributed

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
