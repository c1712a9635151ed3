"""Executors: train the missing runs of a plan into the results store, here or on Ray.

``local`` (the default) trains them side by side in worker processes (``workers``: one run per core
on a CPU), or one after another in this process with ``workers`` 1, as the notebooks do;
``ray`` makes each run a Ray task with a CPU (or GPU) request and a torch thread count set in
the task. ``ray.init()`` starts a local cluster (``workers x threads`` CPUs); ``address`` /
``RAY_ADDRESS`` connects to an existing one. Ray is an optional extra (``pip install -e .[dist]``)
imported only by the ``ray`` executor.

Store safety: the worker holds the run's file lock while it trains, writes checkpoints and the
record atomically (temporary file + rename) and resumes from the last epoch checkpoint when a
retry (Ray's ``max_retries``, after a worker dies) lands on the same storage; the driver writes
the returned record atomically where its own store lacks it (a worker without the driver's
storage). A run that is being trained by another process is waited for, never trained twice.
"""
from __future__ import annotations

import math
import os
import socket

import torch

from ..models import ModelConfig
from ..utils.checks import plain_number
from ..utils.progress import progress
from .profiles import Profile, get_profile
from .runner import measure_config_costs, run_experiment
from .spec import PlannedRun
from .store import ResultsStore

EXECUTORS = ("local", "ray")
EXECUTOR_ENV_VAR = "MNV2_EXECUTOR"
RAY_MAX_RETRIES = 3  # a run whose worker dies (killed, out of memory, node lost) is tried again
# ray.init retries an unreachable address for minutes; a plain TCP connect answers in milliseconds
RAY_CONNECT_TIMEOUT_S = 3.0


class GridError(RuntimeError):
    """Some runs of the grid failed; the message names them. The others are in the store."""


def resolve_executor(executor: str | None = None) -> str:
    """``executor``, else ``$MNV2_EXECUTOR``, else ``local``; a ValueError naming the allowed values."""
    name = executor or os.environ.get(EXECUTOR_ENV_VAR) or "local"
    if name not in EXECUTORS:
        field = "executor" if executor else EXECUTOR_ENV_VAR
        raise ValueError(f"{field}: got {name!r}; allowed values are {EXECUTORS}")
    return name


def _check_count(field: str, value, minimum: int = 1) -> None:
    value = plain_number(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{field}: got {value!r}; allowed values are integers >= {minimum} (or None)")


def check_ray_address(address: str | None, field: str = "address") -> None:
    """A ValueError naming ``field`` within seconds when nothing listens at ``address`` (host:port or
    ray://host:port); "auto", "local" and no address are left to Ray."""
    if not address or address in ("auto", "local"):
        return
    if not isinstance(address, str):
        raise ValueError(f"{field}: got {address!r}; allowed: host:port of a Ray head (e.g. 10.0.0.5:6379)")
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{field}: got {address!r}; allowed: host:port of a Ray head (e.g. 10.0.0.5:6379, as "
                         "`ray start --head` prints it), ray://host:port, 'auto', or none for a local cluster")
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ValueError(f"{field}: got {address!r}, but nothing answers at {host}:{port} ({reason}; waited at most "
                         f"{RAY_CONNECT_TIMEOUT_S:g} s); allowed: the address of a running Ray head (`ray start "
                         "--head` prints it), or no address for a local cluster") from None


def check_options(executor: str | None = None, address: str | None = None, workers: int | None = None,
                  threads: int | None = None, gpus_per_run: float | None = None) -> str:
    """The executor's name, or a ValueError naming the option that does not fit (before any work)."""
    executor = resolve_executor(executor)
    _check_count("workers", workers)
    _check_count("threads", threads)
    gpus = plain_number(gpus_per_run)
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus)
                             or gpus < 0):
        raise ValueError(f"gpus_per_run: got {gpus_per_run!r}; allowed values are finite numbers >= 0")
    if executor == "local" and address:
        raise ValueError(f"address: got {address!r} with executor 'local'; allowed: an address only with 'ray'")
    if executor == "local" and gpus:
        raise ValueError(f"gpus_per_run: got {gpus_per_run!r} with executor 'local'; allowed: 0 (a GPU request "
                         "is for Ray's tasks; the local executor uses the profile's device)")
    if executor == "ray":
        check_ray_address(address or os.environ.get("RAY_ADDRESS"), "address" if address else "RAY_ADDRESS")
    return executor


def missing_runs(runs: list[PlannedRun], store: ResultsStore) -> list[PlannedRun]:
    """The runs of ``runs`` without a finished or failed record in ``store``."""
    out = []
    for run in runs:
        record = store.get(run.key)
        if record is None or record["status"] not in ("finished", "failed"):
            out.append(run)
    return out


class _GridProgress:
    """One bar over the grid's runs, its postfix counting runs running and failed."""

    def __init__(self, total: int, enabled: bool, executor: str) -> None:
        self.bar = progress(total=total, enabled=enabled, desc=f"runs ({executor})", unit="run")
        self.failed, self.running = 0, 0
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"running {self.running}, failed {self.failed}", refresh=True)

    def started(self, count: int) -> None:
        self.running = count
        self._show()

    def finished(self, ok: bool, running: int) -> None:
        self.failed += not ok
        self.running = running
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()


def train_runs(runs: list[PlannedRun], profile: str | Profile, dataset, store: ResultsStore | None = None,
               executor: str | None = None, address: str | None = None, workers: int | None = None,
               threads: int | None = None, gpus_per_run: float = 0.0, show_progress: bool = True,
               max_retries: int = RAY_MAX_RETRIES) -> list[dict]:
    """Train the runs of ``runs`` the store lacks; returns every run's record (in ``runs``' order).

    ``threads``: torch threads per run (None: torch's default here, 1 on Ray and beside other runs).
    ``workers``: runs side by side (Ray's local cluster gets ``workers x threads`` CPUs; the local
    executor starts that many processes, None: one run at a time). A run that fails (non-finite loss, or an error) is reported at the end as a GridError
    after every other run has been trained."""
    executor = check_options(executor, address, workers, threads, gpus_per_run)
    profile = get_profile(profile)
    store = store or ResultsStore()
    todo = missing_runs(runs, store)
    bar = _GridProgress(len(todo), show_progress and bool(todo), executor)
    try:
        if todo and executor == "local" and (workers or 1) > 1 and len(todo) > 1:
            errors = _train_side_by_side(todo, profile, dataset, store, workers, threads or 1, bar)
        elif todo and executor == "local":
            errors = _train_local(todo, profile, dataset, store, threads, bar)
        elif todo:
            errors = _train_ray(todo, profile, dataset, store, address, workers, threads or 1, gpus_per_run, bar,
                                max_retries)
        else:
            errors = {}
    finally:
        bar.close()
    records = {run.key: store.get(run.key) for run in runs}
    failed = {run.key: errors.get(run.key) or (records[run.key] or {}).get("error", "no record")
              for run in runs if (records[run.key] or {}).get("status") != "finished"}
    if failed:
        names = {run.key: f"{run.model_config.label} seed {run.seed}" for run in runs}
        raise GridError(f"{len(failed)} of {len(runs)} run(s) did not finish: " + "; ".join(
            f"{key} ({names[key]}): {reason}" for key, reason in failed.items()))
    return [records[run.key] for run in runs]


def _train_local(todo: list[PlannedRun], profile: Profile, dataset, store: ResultsStore, threads: int | None,
                 bar: _GridProgress) -> dict[str, str]:
    errors = {}
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for i, run in enumerate(todo):
            bar.started(1)
            try:
                record = run_experiment(run.model_config, profile, dataset, run.seed, store, show_progress=False)
                ok = record["status"] == "finished"
            except Exception as error:  # noqa: BLE001 - reported with the run's name once the grid is done
                errors[run.key], ok = f"{type(error).__name__}: {error}", False
            bar.finished(ok, running=0)
    finally:
        torch.set_num_threads(before)
    return errors


_WORKER: dict = {}


def _init_worker(dataset, threads: int, results_dir: str, runs_dir: str) -> None:
    """Once per side-by-side process: its thread count, the dataset (sent once, not per run) and the store."""
    torch.set_num_threads(threads)
    _WORKER.update(dataset=dataset, store=ResultsStore(results_dir, runs_dir))


def _train_in_worker(model_config: dict, profile: Profile, seed: int) -> tuple[str, str | None]:
    """One run in a side-by-side process, its costs left to be measured alone: (status, error)."""
    try:
        record = run_experiment(ModelConfig.from_dict(model_config), profile, _WORKER["dataset"], seed,
                                _WORKER["store"], show_progress=False, measure_costs=False)
        return record["status"], record.get("error")
    except Exception as error:  # noqa: BLE001 - reported with the run's name once the grid is done
        return "error", f"{type(error).__name__}: {error}"


def _train_side_by_side(todo: list[PlannedRun], profile: Profile, dataset, store: ResultsStore, workers: int,
                        threads: int, bar: _GridProgress) -> dict[str, str]:
    """The local executor with ``workers`` processes of ``threads`` threads (no Ray): a 2-core machine
    trains two one-thread runs at once faster than one two-thread run after the other. The costs of each
    config (latency, throughput, memory) are measured afterwards in this process, one at a time, so
    that no timing shares the CPU with a training run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    errors, workers = {}, min(workers, len(todo))
    context = multiprocessing.get_context("spawn")  # no forked copy of this process' threads and locks
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(dataset, threads, str(store.results_dir), str(store.runs_dir))) as pool:
        jobs = {pool.submit(_train_in_worker, run.model_config.to_dict(), profile, run.seed): run for run in todo}
        bar.started(min(workers, len(jobs)))
        for done, future in enumerate(as_completed(jobs), start=1):
            run = jobs[future]
            try:
                status, error = future.result()
            except Exception as crash:  # noqa: BLE001 - the worker process died (killed, out of memory)
                status, error = "error", f"{type(crash).__name__}: {crash}"
            if status not in ("finished", "failed"):
                errors[run.key] = error or status
            bar.finished(status == "finished", running=min(workers, len(jobs) - done))
    for run in todo:  # the costs, alone, once per config (cached), written into each record
        record = store.get(run.key)
        if record is not None and record["status"] == "finished" and not record.get("costs"):
            record["costs"] = measure_config_costs(run.model_config, profile, store)
            store.put(record)
    return errors


def local_workers(profile: str | Profile, executor: str | None = None) -> int | None:
    """How many runs ``make reports`` trains side by side: one per core for CPU profiles with the local
    executor (measured on the quick plan with Ray's equivalent: 1.39x), None (one at a time) on a GPU."""
    if resolve_executor(executor) != "local" or torch.cuda.is_available():
        return None
    return max(1, os.cpu_count() or 1) if get_profile(profile).train.device in ("auto", "cpu") else None


def _train_task(model_config: dict, profile: Profile, dataset, seed: int, results_dir: str, runs_dir: str,
                threads: int) -> dict:
    """One run inside a Ray worker: the thread count is set here, where the training happens."""
    torch.set_num_threads(threads)
    store = ResultsStore(results_dir, runs_dir)
    return run_experiment(ModelConfig.from_dict(model_config), profile, dataset, seed, store, show_progress=False)


def ray_init_kwargs(address: str | None, workers: int | None, threads: int) -> dict:
    """``ray.init`` arguments: connect to ``address`` (or ``$RAY_ADDRESS``), else start a local cluster
    of ``workers x threads`` CPUs (default: every core)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    # the workers import mnv2lib as this process does (a source checkout on PYTHONPATH included)
    env = {k: os.environ[k] for k in ("PYTHONPATH", "MNV2_DATA_DIR", "MNV2_PROGRESS", "MNV2_ALLOCATOR") if os.environ.get(k)}
    kwargs = {"include_dashboard": False, "log_to_driver": False, "runtime_env": {"env_vars": env}}
    if address:
        return {"address": address, **kwargs}
    cpus = (workers or max(1, (os.cpu_count() or 1) // threads)) * threads
    return {"num_cpus": cpus, **kwargs}


def _train_ray(todo: list[PlannedRun], profile: Profile, dataset, store: ResultsStore, address: str | None,
               workers: int | None, threads: int, gpus_per_run: float, bar: _GridProgress,
               max_retries: int) -> dict[str, str]:
    try:
        import ray
    except ImportError:
        raise ImportError("executor: 'ray' needs Ray; install the extra with `pip install -e .[dist]`") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**ray_init_kwargs(address, workers, threads))
    elif address:
        raise ValueError(f"address: got {address!r} but Ray is already initialized in this process; allowed: "
                         "no address (the running cluster is used)")
    try:
        task = ray.remote(_train_task).options(num_cpus=threads, num_gpus=gpus_per_run, max_retries=max_retries,
                                               retry_exceptions=False, name="mnv2-run")
        dataset_ref = ray.put(dataset)  # shipped once to the object store, not once per task
        pending = {task.remote(run.model_config.to_dict(), profile, dataset_ref, run.seed,
                               str(store.results_dir.resolve()), str(store.runs_dir.resolve()), threads): run
                   for run in todo}
        slots = max(1, int(ray.cluster_resources().get("CPU", threads) // threads))
        bar.started(min(slots, len(pending)))
        errors = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(done[0])
            try:
                record = ray.get(done[0])
            except Exception as error:  # noqa: BLE001 - the task raised, or its worker died max_retries+1 times
                errors[run.key] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                ok = False
            else:
                if store.get(run.key) is None and record.get("status") in ("finished", "failed"):
                    store.put(record)  # atomic; a worker that wrote to the same storage already did
                ok = record.get("status") == "finished"
            bar.finished(ok, running=min(slots, len(pending)))
        return errors
    finally:
        if started_here:
            ray.shutdown()

