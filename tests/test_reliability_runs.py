"""Issue 31 (runs, store, command lines, configs): every case is a clear error naming the field, option or
file before any loading or training, or the right result.

``ERRORS``: each case must raise the error type with a message that names the thing (a ``SystemExit`` from a
command line: its exit status too, 2 for usage and 1 for a failure, and no traceback). ``SAME``: numpy
numbers must give the very run, key and record that Python numbers give. The Ray address case runs the
command line in a subprocess under a timeout: a regression there hangs for minutes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mnv2lib.engine.data import DatasetNotFoundError, load_dataset
from mnv2lib.engine.train import TrainConfig
from mnv2lib.models import ModelConfig
from mnv2lib.runs import api, executors, profiles, runner, spec
from mnv2lib.runs.executors import GridError
from mnv2lib.runs.store import ResultsStore, StoreLocationError
from mnv2lib.utils import paths
from mnv2lib.workbook import cli
from mnv2lib.workbook import report as reports

CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.05, eval_batch_size=16, device="cpu")
PROFILE = profiles.Profile("reliability", train_size=32, test_size=16, corruption_test_size=16, severities=(1,),
                           corruptions=("contrast",), width_mult=0.25, stem="cifar_lite", seeds=(0,), train=CONFIG,
                           cost_repeats=1)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", train_size=32, test_size=16, progress=False)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctx:
    """What a case may need: a temporary folder, the tiny dataset, monkeypatch."""

    def __init__(self, tmp: Path, dataset, monkeypatch) -> None:
        self.tmp, self.dataset, self.mp = tmp, dataset, monkeypatch
        self.store = ResultsStore(tmp / "results", tmp / "runs")
        monkeypatch.setattr(paths, "RESULTS_DIR", self.store.results_dir)
        monkeypatch.setattr(paths, "RUNS_DIR", self.store.runs_dir)
        monkeypatch.delenv(paths.REPORTS_ENV_VAR, raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def nothing_loads(self) -> None:
        """Loading data or training from here on fails the case: every check comes first."""
        def refuse(*args, **kwargs):
            raise AssertionError("data was loaded or a run trained before the arguments were checked")

        for module, name in ((cli, "load_profile_dataset"), (cli, "plan_notebook_runs"), (cli, "train_plan"),
                             (cli, "ensure_runs"), (cli, "train_ladder"), (api, "ensure_runs"),
                             (api, "load_profile_dataset"), (api, "train_runs"),
                             (runner, "train_model")):
            self.mp.setattr(module, name, refuse)

    def no_gpu(self) -> None:
        self.mp.setattr(torch.cuda, "is_available", lambda: False)


def experiments(ctx: Ctx, *argv: str):
    """``python -m mnv2lib.experiments ARGV`` in this process, failing if it loads or trains anything."""
    ctx.nothing_loads()
    cli.main(list(argv))


def reports_cli(ctx: Ctx, *argv: str):
    ctx.mp.setattr(reports, "execute_notebook", lambda *a, **k: pytest.fail("a notebook kernel was started"))
    ctx.mp.setattr(reports, "run_reports", lambda *a, **k: pytest.fail("the report ran before the arguments "
                                                                       "were checked"))
    return reports.main(list(argv))


def failing(error: BaseException):
    """A function that raises ``error``: a failure deep in the work."""
    def raise_(*args, **kwargs):
        raise error
    return raise_


def patched(where, name: str, error: BaseException):
    return lambda ctx: ctx.mp.setattr(where, name, failing(error))


def exits(set_up, *argv: str):
    """A command line case: ``set_up(ctx)``, then ``python -m mnv2lib.experiments ARGV`` in this process."""
    def case(ctx: Ctx):
        set_up(ctx)
        cli.main(list(argv))
    return case


def _report_fails(ctx: Ctx):
    ctx.mp.setattr(reports, "run_reports", failing(PermissionError(13, "Permission denied", "/store/results/k.json")))
    reports.main(["--profile", "smoke", "--dataset", "synthetic"])


def _reports_dir_is_a_file(ctx: Ctx, *argv: str):
    file = ctx.tmp / "reports-file"
    file.write_text("")
    ctx.mp.setenv(paths.REPORTS_ENV_VAR, str(file))
    ctx.mp.setattr(paths, "RESULTS_DIR", file / "results")
    ctx.mp.setattr(paths, "RUNS_DIR", file / "runs")
    if argv and argv[0] == "reports":
        return reports_cli(ctx, *argv[1:])
    return experiments(ctx, *argv)


GRID_ERROR = GridError("1 of 8 run(s) did not finish: 0123abcd (mish seed 0): NonFiniteLossError: loss is nan")
DENIED = PermissionError(13, "Permission denied", "/store/results/0123abcd.json")
NO_CIFAR = DatasetNotFoundError("CIFAR-100 was not found (download=False).\nLooked in: /data.")
SMOKE = ("--profile", "smoke", "--dataset", "synthetic")

# (id, case, error type, exit status (SystemExit only), what the message must name)
ERRORS = [
    # 3: an unreachable Ray address fails in seconds, naming the option (the subprocess test below: the CLI)
    ("ray address: closed local port", lambda c: executors.check_options("ray", address=f"127.0.0.1:{closed_port()}"),
     ValueError, None, "address"),
    ("ray address: RAY_ADDRESS closed", lambda c: (c.mp.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}"),
                                                   executors.check_options("ray")), ValueError, None, "RAY_ADDRESS"),
    ("ray address: no port", lambda c: executors.check_options("ray", address="127.0.0.1"), ValueError, None,
     "address"),
    # 6: numpy numbers are numbers; a numpy bool is no number
    ("in_channels=np.bool_(True)", lambda c: ModelConfig(in_channels=np.bool_(True)), ValueError, None, "in_channels"),
    ("num_classes=np.float64(10)", lambda c: ModelConfig(num_classes=np.float64(10)), ValueError, None,
     "num_classes"),
    ("seed=True", lambda c: spec.run_key(ModelConfig(), PROFILE, {"name": "s"}, True), ValueError, None, "seed"),
    ("seed=0.5", lambda c: runner.run_experiment(ModelConfig(), PROFILE, c.dataset, 0.5, c.store), ValueError, None,
     "seed"),
    # 7: accepted and ignored before
    ("extra on V2", lambda c: ModelConfig(extra={"depth": 3}), ValueError, None, "extra"),
    ("extra on V1", lambda c: ModelConfig(arch="mobilenet_v1", extra={"depth": 3}), ValueError, None, "extra"),
    ("overrides num_classes 3, dataset 10", lambda c: spec.model_config_for({"num_classes": 3}, PROFILE, 10),
     ValueError, None, "num_classes"),
    ("train --config num_classes", lambda c: experiments(c, "train", *SMOKE, "--config", '{"num_classes": 3}'),
     SystemExit, 2, "num_classes"),
    ("run --gpus-per-run -3", lambda c: experiments(c, "run", *SMOKE, "--gpus-per-run", "-3"), SystemExit, 2,
     "--gpus-per-run"),
    ("run --gpus-per-run 1, local", lambda c: experiments(c, "run", *SMOKE, "--gpus-per-run", "1"), SystemExit, 2,
     "--gpus-per-run"),
    ("gpus_per_run=nan", lambda c: executors.check_options("ray", gpus_per_run=float("nan")), ValueError, None,
     "gpus_per_run"),
    ("reports --notebooks (no names)", lambda c: reports_cli(c, "--notebooks"), SystemExit, 2, "--notebooks"),
    ("reports --notebooks a name twice", lambda c: reports_cli(c, "--notebooks", "04_ablations", "04_ablations"),
     SystemExit, 2, "--notebooks"),
    ("run_reports(notebooks=[])", lambda c: reports.check_arguments("smoke", "synthetic", 0, []), ValueError, None,
     "notebooks"),
    ("plan --notebooks (no names)", lambda c: experiments(c, "plan", *SMOKE, "--notebooks"), SystemExit, 2,
     "--notebooks"),
    ("plan --notebooks a name twice", lambda c: experiments(c, "plan", *SMOKE, "--notebooks", "01_activation_study",
                                                            "01_activation_study"), SystemExit, 2, "--notebooks"),
    # 8: nonsense started without a word
    ("ablation --profile gpu, no GPU", lambda c: (c.no_gpu(), experiments(c, "ablation", "--profile", "gpu",
                                                                           "--dataset", "synthetic")),
     SystemExit, 2, "--allow-cpu"),
    ("train --profile full, no GPU", lambda c: (c.no_gpu(), experiments(c, "train", "--profile", "full", "--dataset",
                                                                         "synthetic")), SystemExit, 2, "days"),
    ("run --profile gpu, no GPU", lambda c: (c.no_gpu(), experiments(c, "run", "--profile", "gpu", "--dataset",
                                                                      "synthetic")), SystemExit, 2, "hours"),
    ("reports --profile gpu, no GPU", lambda c: (c.no_gpu(), reports_cli(c, "--profile", "gpu", "--dataset",
                                                                          "synthetic")), SystemExit, 2, "--allow-cpu"),
    ("ladder --factors 0", lambda c: experiments(c, "ladder", "--dataset", "synthetic", "--factors", "0"), SystemExit,
     2, "--factors"),
    ("train_ladder(factors=(2, 0))", lambda c: (c.nothing_loads(), api.train_ladder("synthetic", factors=(2, 0))),
     ValueError, None, "factor"),
    ("plan, MNV2_REPORTS_DIR a file", lambda c: _reports_dir_is_a_file(c, "plan", *SMOKE), SystemExit, 2,
     "MNV2_REPORTS_DIR"),
    ("reports, MNV2_REPORTS_DIR a file", lambda c: _reports_dir_is_a_file(c, "reports", *SMOKE), SystemExit, 2,
     "MNV2_REPORTS_DIR"),
    ("ResultsStore under a file", lambda c: ((c.tmp / "f").write_text(""), ResultsStore(c.tmp / "f" / "results")),
     StoreLocationError, None, "f/results"),
    # 13: deep errors
    ("train --config bogus field", lambda c: experiments(c, "train", *SMOKE, "--config", '{"bogus": 1}'), SystemExit,
     2, "allowed fields are ['activation'"),
    ("train --config bad value", lambda c: experiments(c, "train", *SMOKE, "--config", '{"activation": "mish2"}'),
     SystemExit, 2, "--config: activation"),
    ("overrides with an unknown field", lambda c: spec.model_config_for({"bogus": 1}, PROFILE, 10), ValueError, None,
     "bogus"),
    ("run: a grid error", exits(patched(cli, "train_plan", GRID_ERROR), "run", *SMOKE), SystemExit, 1, "0123abcd"),
    ("train: store not writable", exits(patched(cli, "run_experiment", DENIED), "train", *SMOKE), SystemExit, 1,
     "/store/results/0123abcd.json"),
    ("ablation: dataset missing", exits(patched(api, "load_profile_dataset", NO_CIFAR), "ablation", *SMOKE),
     SystemExit, 1, "CIFAR-100 was not found"),
    ("plan: dataset missing", exits(patched(cli, "plan_notebook_runs", NO_CIFAR), "plan", *SMOKE), SystemExit, 1,
     "CIFAR-100"),
    ("train --dataset /nonexistent", lambda c: experiments(c, "train", "--dataset", str(c.tmp / "nonexistent")),
     SystemExit, 2, "nonexistent"),
    ("reports: store not writable", _report_fails, SystemExit, 1, "/store/results/k.json"),
]


@pytest.mark.parametrize("case, error, status, names", [pytest.param(f, e, s, n, id=i) for i, f, e, s, n in ERRORS])
def test_a_bad_input_is_a_clear_error(case, error, status, names, tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(error) as caught:
        case(Ctx(tmp_path, tiny, monkeypatch))
    if error is SystemExit:
        err = capsys.readouterr().err
        assert caught.value.code == status, err
        assert "Traceback" not in err
        message = err
    else:
        message = str(caught.value)
    assert names in message, message


def test_an_unreachable_ray_address_fails_in_seconds_naming_the_option(tmp_path):
    """Before: ray.init retried 127.0.0.1:1 for more than 8 minutes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(paths.PROJECT_ROOT),
           "MNV2_REPORTS_DIR": str(tmp_path / "reports")}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mnv2lib.experiments", "run", *SMOKE, "--executor", "ray",
                             "--address", f"127.0.0.1:{closed_port()}"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--address" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - start < 60  # an interpreter, torch and the check; the wait itself is <= 3 s


# --- numpy numbers: the same run, key and record as Python numbers (issue 31, 6) -----------------------

def _key(seed) -> str:
    return spec.run_key(ModelConfig(num_classes=10), PROFILE, {"name": "synthetic"}, seed)


# (id, value made with numpy, the same made with Python numbers)
SAME = [
    ("run key, seed np.int64(0)", lambda: _key(np.int64(0)), lambda: _key(0)),
    ("run key, seed np.uint8(1)", lambda: _key(np.uint8(1)), lambda: _key(1)),
    ("ModelConfig in_channels", lambda: ModelConfig(in_channels=np.int64(3)), lambda: ModelConfig(in_channels=3)),
    ("to_json with numpy numbers", lambda: ModelConfig(num_classes=np.int32(10), width_mult=np.float32(0.5),
                                                       dropout=np.float64(0.25)).to_json(),
     lambda: ModelConfig(num_classes=10, width_mult=0.5, dropout=0.25).to_json()),
    ("attention_kernel np.int64(7)", lambda: ModelConfig(attention="triplet", attention_kernel=np.int64(7)),
     lambda: ModelConfig(attention="triplet", attention_kernel=7)),
    ("expand_ratio np.int64(4)", lambda: ModelConfig(expand_ratio=np.int64(4)), lambda: ModelConfig(expand_ratio=4.0)),
    ("selfnorm_two_gates np.bool_", lambda: ModelConfig(selfnorm_two_gates=np.bool_(True)),
     lambda: ModelConfig(selfnorm_two_gates=True)),
    ("extra of mobilenet_v4_custom",
     lambda: ModelConfig(arch="mobilenet_v4_custom",
                         extra={"base_channels": np.int64(16), "block_counts": [np.int64(1), 1, 2, 2]}).to_json(),
     lambda: ModelConfig(arch="mobilenet_v4_custom",
                         extra={"base_channels": 16, "block_counts": [1, 1, 2, 2]}).to_json()),
    ("overrides of model_config_for",
     lambda: spec.model_config_for({"in_channels": np.int64(3)}, PROFILE, np.int64(10)),
     lambda: spec.model_config_for({"in_channels": 3}, PROFILE, 10)),
    ("RunRequest seeds", lambda: spec.RunRequest({}, (np.int64(0), np.int64(1))).seeds, lambda: (0, 1)),
    ("Profile sizes", lambda: profiles.Profile("p", train_size=np.int64(32), test_size=None,
                                               corruption_test_size=np.int32(16), width_mult=np.float64(0.25),
                                               seeds=(np.int64(0),)).to_dict(),
     lambda: profiles.Profile("p", train_size=32, test_size=None, corruption_test_size=16, width_mult=0.25,
                              seeds=(0,)).to_dict()),
    ("budget_rung factor", lambda: profiles.budget_rung(profiles.PROFILES["quick"], np.int64(2)),
     lambda: profiles.budget_rung(profiles.PROFILES["quick"], 2)),
    ("executor workers", lambda: executors.check_options("ray", workers=np.int64(2), threads=np.int64(1),
                                                         gpus_per_run=np.float32(0.5)), lambda: "ray"),
]


def _types(value):
    """The types all the way down (json writes np.float64 as a float but refuses np.int64)."""
    if dataclasses.is_dataclass(value):
        return _types(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_types(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize("numpy_made, python_made", [pytest.param(a, b, id=i) for i, a, b in SAME])
def test_numpy_numbers_are_python_numbers(numpy_made, python_made):
    made, expected = numpy_made(), python_made()
    assert made == expected
    assert _types(made) == _types(expected)


def test_a_truncated_cost_cache_is_warned_about_by_name_measured_again_and_rewritten(tmp_path):
    """Before: "Unterminated string" from every run that read it, naming no file, and never rebuilt."""
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    config = spec.model_config_for({}, PROFILE, 10)
    first = runner.measure_config_costs(config, PROFILE, store)
    [cache] = (store.results_dir / "costs").glob("*.json")
    for damage in (b'{"parameters": 12', b"[1, 2]", b"\xff\xfe"):  # truncated, not an object, not UTF-8
        cache.write_bytes(damage)
        with pytest.warns(UserWarning, match=str(cache)):
            again = runner.measure_config_costs(config, PROFILE, store)
        assert again["parameters"] == first["parameters"]
        assert json.loads(cache.read_text())["parameters"] == first["parameters"]  # rewritten whole
    assert not list(cache.parent.glob(".*.tmp"))


def test_a_run_asked_with_numpy_numbers_is_the_python_run_trained_once(tiny, tmp_path, monkeypatch):
    """Before: np.int64 seeds gave another key, in_channels=np.int64(3) a record refused on every read."""
    monkeypatch.setattr(runner, "measure_config_costs", lambda *args: {})
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    first = runner.run_experiment(spec.model_config_for({"in_channels": np.int64(3)}, PROFILE, 10), PROFILE, tiny,
                                  np.int64(0), store, show_progress=False)
    stored = json.loads(store.record_path(first["key"]).read_text())
    assert stored["seed"] == 0 and type(stored["seed"]) is int and stored["model_config"]["in_channels"] == 3
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("the same run was trained twice"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a record refused on reading would warn
        again = runner.run_experiment(spec.model_config_for({"in_channels": 3}, PROFILE, 10), PROFILE, tiny, 0, store,
                                      show_progress=False)
    assert again["key"] == first["key"] and len(list(store.results_dir.glob("*.json"))) == 1


def test_profile_gpu_trains_on_the_cpu_when_allowed(tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, None, monkeypatch)
    ctx.no_gpu()
    asked = []
    monkeypatch.setattr(cli, "ensure_runs", lambda configs, profile, dataset, seeds: asked.append((profile, seeds))
                        or [])
    cli.main(["ablation", "--profile", "gpu", "--dataset", "synthetic", "--allow-cpu"])
    assert asked == [("gpu", (0,))]
