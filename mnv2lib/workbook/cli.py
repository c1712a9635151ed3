"""The command line of the results store: ``python -m mnv2lib.experiments plan|run|train|ablation|ladder``."""
from __future__ import annotations

import json

from ..runs.api import ensure_runs, train_ladder
from ..runs.executors import check_options
from ..runs.profiles import LADDER_FACTORS, PROFILES, get_profile
from ..runs.runner import load_profile_dataset, run_experiment
from ..runs.spec import PlannedRun, _canonical, ablation_configs, model_config_for
from ..runs.store import ResultsStore, _wall_seconds, finished
from .plan import plan_notebook_runs, train_plan


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
    from ..engine.train import init_distributed

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
