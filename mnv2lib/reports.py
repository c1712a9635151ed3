"""The report runner: ``python -m mnv2lib.reports --profile quick --dataset auto``.

Executes the numbered notebooks in order with papermill's Python API, writes the
executed copies to ``reports/notebooks/`` and an index of every figure to
``reports/README.md``. A failing notebook stops the run with a non-zero exit that
names the notebook and the cell; its partially executed copy is kept.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

from . import paths

# The workbook's sequence; notebooks not written yet are reported as missing.
NOTEBOOK_SEQUENCE = (
    "01_activation_study",
    "02_triplet_attention",
    "03_cnsn_distributions",
    "04_ablations",
    "05_mobilenet_families",
    "06_mobilenetv2_design",
)
PROFILES = ("smoke", "quick", "gpu", "full")
KERNEL_NAME = "mnv2lib"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=paths.PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _kernel_name() -> str | None:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else None


def execute_notebook(name: str, parameters: dict, output_dir: Path | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill; returns the executed copy's path."""
    import papermill

    output_dir = output_dir or paths.EXECUTED_NOTEBOOKS_DIR
    output_dir.mkdir(parents=True, exist_ok=True)
    source = paths.NOTEBOOKS_DIR / f"{name}.ipynb"
    target = output_dir / f"{name}.ipynb"
    papermill.execute_notebook(
        str(source), str(target), parameters=parameters, kernel_name=_kernel_name(),
        cwd=str(paths.NOTEBOOKS_DIR), progress_bar=False, log_output=False,
    )
    return target


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


def record_timing(name: str, seconds: float, profile: str, dataset: str) -> None:
    timings = read_timings()
    timings[name] = {"seconds": round(seconds, 1), "profile": profile, "dataset": dataset,
                     "finished": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit()}
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
    for name in NOTEBOOK_SEQUENCE:
        if not (paths.EXECUTED_NOTEBOOKS_DIR / f"{name}.ipynb").exists():
            lines.append(f"| {name} | not executed | | | | |")
            continue
        t = timings.get(name, {})
        run_time = f"{t['seconds'] / 60:.1f} min" if "seconds" in t else "?"
        lines.append(f"| [{name}](notebooks/{name}.ipynb) | {t.get('profile', '?')} | {t.get('dataset', '?')} | "
                     f"{run_time} | {t.get('finished', '?')} | {t.get('commit', '?')} |")
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


def run_reports(profile: str = "quick", dataset: str = "auto", seed: int = 0,
                notebooks: list[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError
    from tqdm.auto import tqdm

    if profile not in PROFILES:
        raise ValueError(f"profile: got {profile!r}; allowed values are {PROFILES}")
    wanted = list(notebooks or NOTEBOOK_SEQUENCE)
    unknown = [n for n in wanted if n not in NOTEBOOK_SEQUENCE]
    if unknown:
        raise ValueError(f"notebooks: got {unknown}; allowed values are {NOTEBOOK_SEQUENCE}")
    present = [n for n in wanted if (paths.NOTEBOOKS_DIR / f"{n}.ipynb").exists()]
    missing = [n for n in wanted if n not in present]
    for name in missing:
        print(f"[reports] {name}.ipynb does not exist yet: skipped", file=sys.stderr)
    parameters = {"profile": profile, "dataset": dataset, "seed": seed, "interactive": False}
    start = time.time()
    executed = []
    for name in tqdm(present, desc="notebooks", unit="nb"):
        t0 = time.time()
        try:
            execute_notebook(name, parameters)
        except PapermillExecutionError as error:
            print(f"\n[reports] FAILED: {name}.ipynb, cell {error.exec_count} ({error.ename}: {error.evalue}).\n"
                  f"[reports] The partially executed notebook is kept at "
                  f"{paths.EXECUTED_NOTEBOOKS_DIR / (name + '.ipynb')}", file=sys.stderr)
            return 1
        executed.append(name)
        record_timing(name, time.time() - t0, profile, dataset)
        tqdm.write(f"[reports] {name}: {time.time() - t0:.0f} s")
    index = write_index(executed, missing, profile, dataset, time.time() - start)
    print(f"[reports] executed {len(executed)} notebook(s) in {(time.time() - start) / 60:.1f} min; "
          f"{len(missing)} not written yet; index: {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--dataset", default="auto", help="auto | cifar10 | cifar100 | synthetic | <ImageFolder path>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--notebooks", nargs="*", help="a subset of the sequence, by name")
    args = parser.parse_args(argv)
    return run_reports(args.profile, args.dataset, args.seed, args.notebooks)


if __name__ == "__main__":
    sys.exit(main())
