"""The report runner: ``python -m mnv2lib.reports --profile quick --dataset auto``.

First trains every run the notebooks will ask for that the results store lacks
(``mnv2lib.workbook.plan.train_plan``: ``--executor local|ray``, ``--workers``, ``--threads``,
``--address``), then executes the numbered notebooks with papermill's Python API (those that time
nothing side by side, one kernel per core; the others alone, in order), writes the executed copies
to ``reports/notebooks/`` and an index of every figure to ``reports/README.md``. The arguments are checked before any kernel starts. A failing
notebook stops the run with a non-zero exit that names the notebook and the cell; the
last good executed copy stays in place, the failed one is kept beside it as
``<name>.failed.ipynb`` and the index marks the failure.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from ..utils import paths
from ..utils.provenance import git_commit
from .catalogue import KERNEL_NAME, NOTEBOOK_SEQUENCE, PROFILES, TIMES_NOTHING


# The fields the library's errors start with ("workers: got 0; ...") -> the option that sets each here.
_FLAGS = {"executor": "--executor", "address": "--address", "workers": "--workers", "threads": "--threads",
          "gpus_per_run": "--gpus-per-run", "profile": "--profile", "dataset": "--dataset", "seed": "--seed",
          "notebooks": "--notebooks", "factor": "--factors"}


def as_flag(message: str) -> str:
    """``message`` with its leading field named as the command-line option that sets it."""
    field, sep, rest = message.partition(":")
    return f"{_FLAGS[field]}:{rest}" if sep and field in _FLAGS else message


def fail(prog: str, error: BaseException) -> NoReturn:
    """A failure that is no usage error (a store, a dataset, a run): the message alone, exit status 1."""
    print(f"{prog}: error: {as_flag(str(error))}", file=sys.stderr, flush=True)
    sys.exit(1)


def _kernel_name() -> str | None:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else None


def execute_notebook(name: str, parameters: dict, output_dir: Path | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill; returns the executed copy's path.

    The copy is written under a temporary name and replaces ``<name>.ipynb`` only when every cell
    ran: a failed run leaves the last good copy and goes to ``<name>.failed.ipynb`` (then raises)."""
    import papermill

    output_dir = output_dir or paths.EXECUTED_NOTEBOOKS_DIR
    output_dir.mkdir(parents=True, exist_ok=True)
    source = paths.NOTEBOOKS_DIR / f"{name}.ipynb"
    target, partial = output_dir / f"{name}.ipynb", output_dir / f".{name}.partial.ipynb"
    try:
        papermill.execute_notebook(
            str(source), str(partial), parameters=parameters, kernel_name=_kernel_name(),
            cwd=str(paths.NOTEBOOKS_DIR), progress_bar=False, log_output=False,
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, failed_copy(name, output_dir))
        raise
    os.replace(partial, target)
    failed_copy(name, output_dir).unlink(missing_ok=True)
    return target


def declared_parameters(name: str, parameters: dict) -> dict:
    """The report's shared ``parameters`` that ``notebooks/<name>.ipynb`` declares in its parameters cell
    (notebook 04 alone takes ``factors``): papermill warns of every other one."""
    import papermill

    declared = papermill.inspect_notebook(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"))
    return {k: v for k, v in parameters.items() if k in declared}


def failed_copy(name: str, output_dir: Path | None = None) -> Path:
    """Where the executed copy of a failed run of ``name`` is kept."""
    return (output_dir or paths.EXECUTED_NOTEBOOKS_DIR) / f"{name}.failed.ipynb"


def figure_records() -> list[dict]:
    """The sidecar records (caption, dataset, profile, ...) of every saved figure."""
    records = []
    for sidecar in sorted(paths.FIGURES_DIR.glob("*/*.json")):
        record = json.loads(sidecar.read_text())
        record["png"] = str(sidecar.with_suffix(".png").relative_to(paths.REPORTS_DIR))
        records.append(record)
    return records


def _timings_path() -> Path:
    return paths.EXECUTED_NOTEBOOKS_DIR / "timings.json"


def read_timings() -> dict[str, dict]:
    """Per notebook: how its executed copy in reports/notebooks/ was made (seconds, profile, ...)."""
    path = _timings_path()
    return json.loads(path.read_text()) if path.exists() else {}


def record_timing(name: str, seconds: float, profile: str, dataset: str, error: str | None = None) -> None:
    """Record a finished run of ``name``; with ``error``, a failed one (kept beside the last good run's)."""
    timings = read_timings()
    now = {"seconds": round(seconds, 1), "profile": profile, "dataset": dataset,
           "finished": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit()}
    if error is None:
        timings[name] = now
    else:
        timings.setdefault(name, {})["failed"] = {**now, "error": error}
    _timings_path().parent.mkdir(parents=True, exist_ok=True)
    _timings_path().write_text(json.dumps(timings, indent=2))


def write_index(executed: list[str], missing: list[str], profile: str, dataset: str, seconds: float) -> Path:
    """reports/README.md: this run, every executed notebook on disk (also those of earlier runs, with
    how and when each was made) and every figure with its caption and provenance."""
    this_run = ", ".join(executed) if len(executed) < len(NOTEBOOK_SEQUENCE) else "all notebooks"
    lines = [
        "# Reports",
        "",
        f"Last `make reports` run: {this_run} (profile `{profile}`, dataset `{dataset}`) on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} at commit `{git_commit()}`, in {seconds / 60:.1f} min.",
        "",
        "## Notebooks",
        "",
        "| notebook | profile | dataset | run time | finished | commit |",
        "|---|---|---|---|---|---|",
    ]
    timings = read_timings()
    failures = []
    for name in NOTEBOOK_SEQUENCE:
        t = timings.get(name, {})
        if "failed" in t and failed_copy(name).exists():
            f = t["failed"]
            failures.append(f"- **{name} FAILED** on {f['finished']} (profile `{f['profile']}`, dataset "
                            f"`{f['dataset']}`, commit `{f['commit']}`): {f['error']}. The failed copy is "
                            f"[notebooks/{name}.failed.ipynb](notebooks/{name}.failed.ipynb)"
                            + ("; the table lists the last good run." if "seconds" in t else "."))
        if not (paths.EXECUTED_NOTEBOOKS_DIR / f"{name}.ipynb").exists():
            lines.append(f"| {name} | not executed | | | | |")
            continue
        run_time = f"{t['seconds'] / 60:.1f} min" if "seconds" in t else "?"
        lines.append(f"| [{name}](notebooks/{name}.ipynb) | {t.get('profile', '?')} | {t.get('dataset', '?')} | "
                     f"{run_time} | {t.get('finished', '?')} | {t.get('commit', '?')} |")
    if failures:
        lines += ["", "Failed runs:", "", *failures]
    lines += [f"- {name}: not in this version of the workbook" for name in missing]
    lines += ["", "## Figures", ""]
    for record in figure_records():
        lines += [
            f"### {record['notebook']} / {record['name']}",
            "",
            f"![{record['name']}]({record['png']})",
            "",
            f"{record['caption']}",
            "",
            f"*Dataset: {record['dataset']}; profile: {record['profile']}; seed(s): {record['seeds']}; "
            f"made {record['date']}.*",
            "",
        ]
    index = paths.REPORTS_DIR / "README.md"
    index.write_text("\n".join(lines))
    return index


def notebook_workers() -> int:
    """Kernels side by side for the notebooks that time nothing: one per core, at most two (each holds
    a model, a dataset and torch; two already keep a 2-core CPU busy)."""
    return max(1, min(2, os.cpu_count() or 1))


def notebook_groups(names: list[str], workers: int) -> list[list[str]]:
    """``names`` in the sequence's order, as groups executed one after another: the notebooks that time
    nothing together in one group (side by side when ``workers`` > 1), every other notebook alone."""
    untimed = [n for n in names if n in TIMES_NOTHING] if workers > 1 else []
    groups, placed = [], False
    for name in names:
        if name not in untimed:
            groups.append([name])
        elif not placed:
            groups.append(untimed)
            placed = True
    return groups


def _execute_timed(name: str, parameters: dict, threads: int | None = None) -> tuple[str, float, str | None]:
    """(name, seconds, None) when every cell ran, or the failing cell as the third item."""
    from papermill.exceptions import PapermillExecutionError

    if threads is not None:  # the kernel inherits it: two kernels on two cores, one thread each
        os.environ["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    try:
        execute_notebook(name, parameters)
    except PapermillExecutionError as error:
        return name, time.time() - t0, f"cell {error.exec_count} ({error.ename}: {error.evalue})"
    return name, time.time() - t0, None


def _execute_group(group: list[str], parameters: dict[str, dict],
                   execute=_execute_timed) -> list[tuple[str, float, str | None]]:
    """``execute`` (a module-level function: it goes to worker processes) for each notebook of ``group``:
    in this process when alone, else in worker processes side by side (every one runs to its end, a
    failure of another notwithstanding); outcomes in ``group``'s order."""
    if len(group) == 1:
        return [execute(group[0], parameters[group[0]])]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(group), notebook_workers())
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute, name, parameters[name], threads) for name in group]
        return [future.result() for future in futures]


def run_reports(profile: str = "quick", dataset: str = "auto", seed: int = 0,
                notebooks: list[str] | None = None, train_first: bool = True, factors: str | None = None,
                **executor_options) -> int:
    """Train the notebooks' runs (``train_first``; ``executor_options`` go to ``mnv2lib.runs.executors.train_runs``),
    then execute the notebooks. ``factors``: the ablation's factors (notebook 04's parameter, comma-separated
    names; None: the three improvements). Returns the exit status."""
    from ..runs.spec import DEFAULT_FACTORS, parse_factors

    from tqdm.auto import tqdm

    present, missing = check_arguments(profile, dataset, seed, notebooks)
    for name in missing:
        print(f"[reports] {name}.ipynb does not exist yet: skipped", file=sys.stderr)
    factors = DEFAULT_FACTORS if factors is None else factors
    parse_factors(factors)  # before anything trains
    parameters = {"profile": profile, "dataset": dataset, "seed": seed, "interactive": False, "factors": factors}
    start = time.time()
    if train_first and present:
        from ..runs.executors import GridError
        from .plan import train_plan

        from ..runs.executors import local_workers

        if executor_options.get("workers") is None:  # one run per core on a CPU (the local executor)
            executor_options["workers"] = local_workers(profile, executor_options.get("executor"))
        try:
            train_plan(profile, dataset, seed, present, factors=factors, **executor_options)
        except GridError as error:  # the notebooks still run: they leave failed runs out of their tables
            print(f"[reports] {error}", file=sys.stderr)
        print(f"[reports] runs of the plan trained in {(time.time() - start) / 60:.1f} min", flush=True)
    executed = []
    for group in notebook_groups(present, notebook_workers()):
        outcomes = _execute_group(group, {name: declared_parameters(name, parameters) for name in group})
        failed = [(name, seconds, reason) for name, seconds, reason in outcomes if reason is not None]
        for name, seconds, reason in outcomes:
            record_timing(name, seconds, profile, dataset, error=reason)
            if reason is None:
                executed.append(name)
                tqdm.write(f"[reports] {name}: {seconds:.0f} s")
        if failed:
            write_index(executed, missing, profile, dataset, time.time() - start)
            for name, _, reason in failed:
                print(f"\n[reports] FAILED: {name}.ipynb, {reason}.\n[reports] The partially executed notebook is "
                      f"kept at {failed_copy(name)}; the last good one (if any) stays at "
                      f"{paths.EXECUTED_NOTEBOOKS_DIR / (name + '.ipynb')}", file=sys.stderr)
            return 1
    index = write_index(executed, missing, profile, dataset, time.time() - start)
    from ..runs.store import export_results

    table = export_results()  # every run of the store, the notebooks' included, as one CSV beside the index
    print(f"[reports] executed {len(executed)} notebook(s) in {(time.time() - start) / 60:.1f} min; "
          f"{len(missing)} not written yet; index: {index}; results: {table}")
    return 0


def check_arguments(profile: str, dataset: str, seed: int, notebooks: list[str] | None) -> tuple[list, list]:
    """(notebooks to run, notebooks of the sequence not written yet); a ValueError or FileNotFoundError
    naming the argument when one is wrong. Cheap: runs before any kernel starts (that takes ~25 s)."""
    from ..engine.data import check_dataset_name
    from ..utils.checks import check_int

    if profile not in PROFILES:
        raise ValueError(f"profile: got {profile!r}; allowed values are {PROFILES}")
    check_dataset_name(dataset)
    check_int("seed", seed, 0)
    if notebooks is not None and not notebooks:  # [] is not "all of them"
        raise ValueError(f"notebooks: got []; allowed: one or more of {NOTEBOOK_SEQUENCE}, or None for all")
    twice = sorted({n for n in notebooks or () if list(notebooks).count(n) > 1})
    if twice:  # it would be executed twice
        raise ValueError(f"notebooks: got {twice} more than once; allowed: each notebook once")
    wanted = list(notebooks or NOTEBOOK_SEQUENCE)
    unknown = [n for n in wanted if n not in NOTEBOOK_SEQUENCE]
    if unknown:
        raise ValueError(f"notebooks: got {unknown}; allowed values are {NOTEBOOK_SEQUENCE}")
    present = [n for n in wanted if (paths.NOTEBOOKS_DIR / f"{n}.ipynb").exists()]
    missing = [n for n in wanted if n not in present]
    if notebooks and missing:  # asked for by name: not a silent skip
        raise FileNotFoundError(f"notebooks: {', '.join(str(paths.NOTEBOOKS_DIR / (n + '.ipynb')) for n in missing)} "
                                f"does not exist; allowed: notebooks present in {paths.NOTEBOOKS_DIR}")
    return present, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--dataset", default="auto", help="auto | cifar10 | cifar100 | synthetic | <ImageFolder path>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--notebooks", nargs="+", help="a subset of the sequence, by name")
    parser.add_argument("--executor", default=None, help="trains the plan's runs: local (default; or "
                                                          "$MNV2_EXECUTOR) | ray")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local one)")
    parser.add_argument("--workers", type=int, default=None, help="runs side by side (default: one per core on a "
                                                                   "CPU, one at a time on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--allow-cpu", action="store_true", help="train a GPU profile (gpu, full) on a machine "
                                                                 "without CUDA (hours to days)")
    parser.add_argument("--factors", default=None, help="the ablation's factors (notebook 04), comma-separated: "
                                                        "mish,triplet,cnsn (default), cn, sn, or any registered "
                                                        "activation or attention (MNV2_PLUGINS)")
    args = parser.parse_args(argv)
    options = dict(executor=args.executor, address=args.address, workers=args.workers, threads=args.threads)
    try:
        check_arguments(args.profile, args.dataset, args.seed, args.notebooks)
        from ..runs.executors import check_options
        from ..runs.profiles import check_device_for
        from ..runs.store import ResultsStore

        from ..runs.spec import parse_factors

        ResultsStore()  # MNV2_REPORTS_DIR naming a file
        if args.factors is not None:
            parse_factors(args.factors)
        check_options(**options)
        check_device_for(args.profile, args.allow_cpu)
    except (ValueError, FileNotFoundError) as error:
        parser.error(as_flag(str(error)))  # exit status 2, with the usage line
    try:
        return run_reports(args.profile, args.dataset, args.seed, args.notebooks, factors=args.factors, **options)
    except (ValueError, OSError, ImportError) as error:  # a dataset, the store: the message, not a traceback
        fail(parser.prog, error)


if __name__ == "__main__":
    sys.exit(main())
