"""Issue 16: every bad input gets a clear error, no fault loses or poisons a result.

``CASES`` is the table of bad inputs: each must raise the given error type with a message that
names the field or the file. The tests after it cover the faults whose right answer is a
behaviour (skip with a warning, start again, wait for another process), the security case of a
planted CIFAR pickle, and resume after ``kill -9``. Everything trains tiny models on a few dozen
synthetic images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv2lib import build_model
from mnv2lib.utils import paths
from mnv2lib.workbook import report as reports
from mnv2lib import summary
from mnv2lib.runs import api, profiles, runner, spec
from mnv2lib.runs.store import (BadRecordWarning, CorruptRunError, ResultsStore, finished, load_results, records_to_frame)
from mnv2lib.engine.data import DatasetIntegrityError, load_dataset, torch_threads
from mnv2lib.models import ModelConfig
from mnv2lib.models.pretrained import read_state_dict
from mnv2lib.engine.train import (CheckpointError, TrainConfig, TrainingDivergedError, check_divergence, evaluate, resolve_device, train_model)

TINY = dict(num_classes=10, width_mult=0.25, stem="cifar_lite")
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.05, eval_batch_size=16, device="cpu")
PROFILE = profiles.Profile("bad-inputs", train_size=32, test_size=16, corruption_test_size=16, severities=(1,),
                    corruptions=("contrast",), width_mult=0.25, stem="cifar_lite", seeds=(0,), train=CONFIG)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", train_size=32, test_size=16, progress=False)


@pytest.fixture
def no_costs(monkeypatch):
    """Runs here are about their records, not their cost measurements (seconds each)."""
    monkeypatch.setattr(runner, "measure_config_costs", lambda *args: {})


class Ctx:
    """What a case may need: a temporary folder and the tiny dataset."""

    def __init__(self, tmp_path: Path, dataset) -> None:
        self.tmp, self.dataset = tmp_path, dataset


def _image_folder(root: Path, per_class: int = 2, classes=("a", "b"), fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    return root


def _truncated_jpeg(ctx: Ctx):
    root = _image_folder(ctx.tmp / "jpegs", fmt="JPEG")
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    load_dataset(root, progress=False)


def _empty_class_folder(ctx: Ctx):
    root = _image_folder(ctx.tmp / "empty")
    (root / "train" / "c").mkdir()  # test/c has images: the classes match, train/c is just empty
    _image_folder(ctx.tmp / "other", per_class=1, classes=("c",))
    (ctx.tmp / "other" / "test" / "c").rename(root / "test" / "c")
    load_dataset(root, progress=False)


def _checkpoint(ctx: Ctx, **model) -> Path:
    path = ctx.tmp / "checkpoint.pt"
    torch.manual_seed(0)
    train_model(build_model(**{**TINY, **model}), ctx.dataset, dataclasses.replace(CONFIG, epochs=2),
                checkpoint_path=path, show_progress=False, stop_after_epoch=1)
    return path


def _resume(ctx: Ctx, path: Path, **model):
    train_model(build_model(**{**TINY, **model}), ctx.dataset, dataclasses.replace(CONFIG, epochs=2),
                checkpoint_path=path, show_progress=False)


def _truncated_checkpoint(ctx: Ctx):
    path = _checkpoint(ctx)
    path.write_bytes(path.read_bytes()[:1000])
    _resume(ctx, path)


def _model_pt(ctx: Ctx):
    store = ResultsStore(ctx.tmp / "results", ctx.tmp / "runs")
    record = {"key": "k", "label": "baseline", "model_config": ModelConfig(**TINY).to_dict()}
    (ctx.tmp / "runs" / "k").mkdir(parents=True)
    (ctx.tmp / "runs" / "k" / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    runner.load_trained_model(record, store)


def _reports(ctx: Ctx, *argv: str, notebooks_dir: Path | None = None):
    """``python -m mnv2lib.reports ARGV``, with a kernel start that fails loudly if it is reached."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("a notebook kernel was started before the arguments were checked")

    old = (reports.execute_notebook, paths.NOTEBOOKS_DIR)
    reports.execute_notebook = no_kernel
    paths.NOTEBOOKS_DIR = notebooks_dir or paths.NOTEBOOKS_DIR
    try:
        return reports.main(list(argv))
    finally:
        reports.execute_notebook, paths.NOTEBOOKS_DIR = old


def _tiny_model():
    return build_model(**TINY)


# (id, case, error type, what the message must name)
CASES = [
    # ModelConfig: types (bools are not numbers here) and ranges
    ("in_channels=True", lambda c: ModelConfig(in_channels=True), ValueError, "in_channels"),
    ("width_mult=True", lambda c: ModelConfig(width_mult=True), ValueError, "width_mult"),
    ("width_mult=inf", lambda c: ModelConfig(width_mult=math.inf), ValueError, "width_mult"),
    ("width_mult=1e6", lambda c: ModelConfig(width_mult=1e6), ValueError, "width_mult"),
    ("expand_ratio=inf", lambda c: ModelConfig(expand_ratio=math.inf), ValueError, "expand_ratio"),
    ("dropout='0.2'", lambda c: ModelConfig(dropout="0.2"), ValueError, "dropout"),
    ("selfnorm_two_gates='yes'", lambda c: ModelConfig(selfnorm_two_gates="yes"), ValueError, "selfnorm_two_gates"),
    ("extra=[1, 2]", lambda c: ModelConfig(extra=[1, 2]), ValueError, "extra"),
    ("num_classes=True", lambda c: ModelConfig(num_classes=True), ValueError, "num_classes"),
    # TrainConfig
    ("epochs=True", lambda c: TrainConfig(epochs=True), ValueError, "epochs"),
    ("warmup_fraction=2", lambda c: TrainConfig(warmup_fraction=2), ValueError, "warmup_fraction"),
    ("new_module_lr_mult=-1", lambda c: TrainConfig(new_module_lr_mult=-1), ValueError, "new_module_lr_mult"),
    ("lr='0.1'", lambda c: TrainConfig(lr="0.1"), ValueError, "lr"),
    ("lr=inf", lambda c: TrainConfig(lr=math.inf), ValueError, "lr"),
    ("momentum=-1", lambda c: TrainConfig(momentum=-1), ValueError, "momentum"),
    ("weight_decay=nan", lambda c: TrainConfig(weight_decay=math.nan), ValueError, "weight_decay"),
    ("amp='no'", lambda c: TrainConfig(amp="no"), ValueError, "amp"),
    ("device='tpu'", lambda c: TrainConfig(device="tpu"), ValueError, "device"),
    ("device='cuda:99' (absent)", lambda c: resolve_device("cuda:99"), ValueError, "device"),
    # model inputs
    ("float64 input", lambda c: _tiny_model()(torch.zeros(2, 3, 32, 32, dtype=torch.float64)), ValueError, "dtype"),
    ("float16 input", lambda c: _tiny_model()(torch.zeros(2, 3, 32, 32, dtype=torch.float16)), ValueError, "dtype"),
    ("int64 input", lambda c: _tiny_model()(torch.zeros(2, 3, 32, 32, dtype=torch.int64)), ValueError, "dtype"),
    ("uint8 input", lambda c: _tiny_model()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), ValueError, "normalize"),
    ("one 1x1 image, training mode", lambda c: _tiny_model().train()(torch.zeros(1, 3, 1, 1)), ValueError,
     "batch of 1"),
    ("summary, 4 channels", lambda c: summary(_tiny_model(), (1, 4, 32, 32)), ValueError, "input_size"),
    ("summary, 3-D size", lambda c: summary(_tiny_model(), (3, 32, 32)), ValueError, "input_size"),
    ("pretrained file of random bytes", lambda c: (c.tmp / "w.pth").write_bytes(os.urandom(4096))
     and read_state_dict(c.tmp / "w.pth"), ValueError, "w.pth"),
    # data
    ("truncated JPEG", _truncated_jpeg, ValueError, "1.jpg"),
    ("class folder without training images", _empty_class_folder, ValueError, "train/c"),
    ("model num_classes < dataset classes", lambda c: train_model(
        build_model(**{**TINY, "num_classes": 5}), c.dataset, CONFIG, show_progress=False), ValueError, "num_classes"),
    ("labels >= model outputs (evaluate)", lambda c: evaluate(
        build_model(**{**TINY, "num_classes": 5}), c.dataset.test_images, c.dataset.test_labels, c.dataset.mean,
        c.dataset.std, device="cpu"), ValueError, "labels"),
    # checkpoints and weights
    ("truncated checkpoint", _truncated_checkpoint, CheckpointError, "checkpoint.pt"),
    ("checkpoint of another architecture", lambda c: _resume(c, _checkpoint(c), width_mult=0.5), CheckpointError,
     "checkpoint.pt"),
    # same tensor shapes, another model (issue: Mish into ReLU6; SiLU here, it needs no C kernel build)
    ("SiLU checkpoint into a ReLU6 model", lambda c: _resume(c, _checkpoint(c, activation="silu")), CheckpointError,
     "another model"),
    ("truncated model.pt", _model_pt, CorruptRunError, "model.pt"),
    # the report runner: checked before any kernel starts, exit status 2 (argparse's)
    ("reports --dataset /nonexistent", lambda c: _reports(c, "--dataset", "/nonexistent"), SystemExit,
     "/nonexistent"),
    ("reports --notebooks <missing file>", lambda c: _reports(c, "--notebooks", "04_ablations",
                                                             notebooks_dir=c.tmp), SystemExit, "04_ablations.ipynb"),
    ("reports --seed -1", lambda c: _reports(c, "--seed", "-1"), SystemExit, "seed"),
]


@pytest.mark.parametrize("case, error, names", [pytest.param(f, e, n, id=i) for i, f, e, n in CASES])
def test_bad_input_gives_a_clear_error(case, error, names, tiny, tmp_path, capsys):
    with pytest.raises(error) as caught:
        case(Ctx(tmp_path, tiny))
    message = capsys.readouterr().err if error is SystemExit else str(caught.value)
    if error is SystemExit:
        assert caught.value.code == 2
    assert names in message, message
    assert "weights_only=False" not in message  # never suggest the unsafe load


# --- silently wrong before: now a failed run, a warning, or the right result --------------------------


def test_check_divergence_flags_a_huge_or_rising_loss_after_warm_up():
    def epoch(e, loss, acc=0.1):
        return {"epoch": e, "train_loss": loss, "train_accuracy": acc, "test_loss": 2.0, "test_accuracy": acc}

    assert check_divergence([epoch(1, 2.2)], 10) is None
    assert check_divergence([epoch(1, math.nan)], 10) and "nan" in check_divergence([epoch(1, math.nan)], 10)
    assert check_divergence([epoch(1, 30.0)], 10, warmup=1) is None  # a spike while the lr warms up
    assert "diverged" in check_divergence([epoch(1, 30.0)], 10, warmup=1, final=True)  # 10 ln 10 = 23
    assert "diverged" in check_divergence([epoch(1, 5e12)], 10)
    assert "chance" in check_divergence([epoch(1, 4.0), epoch(2, 6.0, acc=0.09)], 10, warmup=1)
    assert check_divergence([epoch(1, 6.0), epoch(2, 4.0, acc=0.09)], 10, warmup=1) is None  # recovering


def test_a_diverged_run_is_recorded_failed_and_never_enters_a_table(tiny, tmp_path, no_costs):
    profile = dataclasses.replace(PROFILE, train=dataclasses.replace(CONFIG, lr=1e3))
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    record = runner.run_experiment(spec.model_config_for({}, profile, 10), profile, tiny, 0, store, show_progress=False)
    assert record["status"] == "failed" and "diverged" in record["error"], record.get("error")
    assert store.get(record["key"])["status"] == "failed"
    assert load_results(store).empty and finished([record]) == []
    with pytest.raises(TrainingDivergedError):
        train_model(build_model(**TINY), tiny, profile.train, show_progress=False)


BAD_RECORDS = {
    "truncated": '{"key": "x", "sta',
    "a list": "[1, 2]",
    "empty object": "{}",
    "no model_config": json.dumps({"key": "{key}", "status": "finished", "seed": 0, "dataset": {"name": "s"}}),
    "clean_accuracy 'high'": None,  # a finished record with clean_accuracy = "high"
    "unknown status": None,
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_a_bad_record_file_is_skipped_with_a_warning_naming_it(kind, tmp_path):
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    good = {"key": "good", "status": "finished", "seed": 0, "model_config": ModelConfig(**TINY).to_dict(),
            "dataset": {"name": "synthetic"}, "history": [{"epoch": 1}], "clean_accuracy": 0.5,
            "mean_corruption_accuracy": 0.4, "costs": {}}
    store.put(good)
    text = BAD_RECORDS[kind]
    if kind == "clean_accuracy 'high'":
        text = json.dumps({**good, "key": "bad", "clean_accuracy": "high"})
    elif kind == "unknown status":
        text = json.dumps({**good, "key": "bad", "status": "done"})
    bad = store.record_path("bad")
    bad.write_text((text or "").replace("{key}", "bad"))
    with pytest.warns(BadRecordWarning, match=str(bad)):
        records = store.records()
    assert [r["key"] for r in records] == ["good"]
    with pytest.warns(BadRecordWarning):
        assert store.get("bad") is None  # a run that is needed is then trained again
        assert list(load_results(store)["key"]) == ["good"]
    if kind not in ("truncated", "a list"):  # a bad record handed over directly is left out too
        with pytest.warns(BadRecordWarning, match="left out"):
            assert list(records_to_frame([good, json.loads(text.replace("{key}", "bad"))])["key"]) == ["good"]


def test_a_replaced_image_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    root = _image_folder(tmp_path / "folder")
    first = load_dataset(root, progress=False)
    target = root / "train" / "a" / "0.png"
    stat = target.stat()
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(target, "PNG")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even within the folder's old mtime
    second = load_dataset(root, progress=False)
    position = int((second.train_indices == 0).nonzero())
    assert bool((second.train_images[position] == 7).all())
    assert not torch.equal(first.train_images, second.train_images)


def test_an_unwritable_or_wrong_decode_cache_is_worked_around(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "folder")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "not-a-folder" / "cache")  # cannot be created
    with pytest.warns(UserWarning, match="cannot write"):
        reference = load_dataset(root, progress=False)
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    load_dataset(root, progress=False)
    for cache in (tmp_path / "cache" / "images").glob("*.pt"):
        torch.save({"images": torch.zeros(1)}, cache)  # another schema: no 'labels'
    with pytest.warns(UserWarning, match="decoding again"):
        again = load_dataset(root, progress=False)
    assert torch.equal(again.train_images, reference.train_images)


def test_a_corrupt_checkpoint_is_moved_aside_and_the_run_starts_again(tiny, tmp_path, no_costs):
    profile = dataclasses.replace(PROFILE, train=dataclasses.replace(CONFIG, epochs=2))
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    config = spec.model_config_for({}, profile, 10)
    partial = runner.run_experiment(config, profile, tiny, 0, store, show_progress=False, stop_after_epoch=1)
    checkpoint = store.run_dir(partial["key"]) / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    with pytest.warns(UserWarning, match="from the start"):
        record = runner.run_experiment(config, profile, tiny, 0, store, show_progress=False)
    assert record["status"] == "finished" and record["resumed_from_epoch"] == 0
    assert checkpoint.with_name("checkpoint.pt.corrupt").exists()


def test_damaged_weights_of_a_finished_run_are_trained_again(tiny, tmp_path, no_costs):
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    _, record = api.trained_model({}, PROFILE, tiny, 0, store, show_progress=False)
    weights = store.run_dir(record["key"]) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.warns(UserWarning, match="model.pt"):
        model, again = api.trained_model({}, PROFILE, tiny, 0, store, show_progress=False)
    losses = [[e["train_loss"] for e in r["history"]] for r in (record, again)]
    assert again["status"] == "finished" and losses[0] == losses[1] and not model.training
    assert weights.with_name("model.pt.corrupt").exists()


def test_a_second_process_waits_for_the_first_ones_result(tiny, tmp_path, monkeypatch):
    from filelock import FileLock

    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    config = spec.model_config_for({}, PROFILE, 10)
    key = spec.run_key(config, PROFILE, spec.dataset_identity(tiny), 0)
    store.runs_dir.mkdir(parents=True)
    holding = threading.Event()

    def other_process():  # holds the run's lock while "training", then writes the record
        with FileLock(str(store.runs_dir / f".{key}.lock")):
            holding.set()
            time.sleep(0.5)
            store.put({"key": key, "status": "failed", "seed": 0, "model_config": config.to_dict(),
                       "dataset": {"name": "synthetic"}, "error": "written by the other process"})

    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("the run was trained twice"))
    thread = threading.Thread(target=other_process)
    thread.start()
    holding.wait(10)
    record = runner.run_experiment(config, PROFILE, tiny, 0, store, show_progress=False)
    thread.join()
    assert record["error"] == "written by the other process"


def test_a_failed_report_rerun_keeps_the_last_good_notebook(tmp_path, monkeypatch):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    for name in ("REPORTS_DIR", "FIGURES_DIR", "EXECUTED_NOTEBOOKS_DIR", "NOTEBOOKS_DIR"):
        monkeypatch.setattr(paths, name, tmp_path / {"REPORTS_DIR": "", "FIGURES_DIR": "figures",
                                                     "EXECUTED_NOTEBOOKS_DIR": "executed",
                                                     "NOTEBOOKS_DIR": "notebooks"}[name])
    (tmp_path / "notebooks").mkdir()
    import nbformat

    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "notebooks" / "04_ablations.ipynb")  # papermill reads it
    outcome = {"fail": False}

    def fake_execute(source, output, **kwargs):
        Path(output).write_text(json.dumps({"run": "failed" if outcome["fail"] else "good"}))
        if outcome["fail"]:
            raise PapermillExecutionError(2, 3, "1 / 0", "ZeroDivisionError", "division by zero", [])

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(reports, "_kernel_name", lambda: None)
    assert reports.run_reports("smoke", "synthetic", notebooks=["04_ablations"], train_first=False) == 0
    outcome["fail"] = True
    assert reports.run_reports("smoke", "synthetic", notebooks=["04_ablations"], train_first=False) == 1
    executed = tmp_path / "executed"
    assert json.loads((executed / "04_ablations.ipynb").read_text()) == {"run": "good"}
    assert json.loads((executed / "04_ablations.failed.ipynb").read_text()) == {"run": "failed"}
    index = (tmp_path / "README.md").read_text()
    assert "04_ablations FAILED" in index and "ZeroDivisionError" in index and "04_ablations.failed.ipynb" in index
    outcome["fail"] = False  # a good rerun clears the failure
    assert reports.run_reports("smoke", "synthetic", notebooks=["04_ablations"], train_first=False) == 0
    assert not (executed / "04_ablations.failed.ipynb").exists()


# --- security: a planted CIFAR pickle is never unpickled ----------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_planted_cifar_pickle_is_refused_before_it_is_unpickled(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DatasetIntegrityError, match="data_batch_1.*MD5"):
        load_dataset("auto", root=tmp_path, progress=False)
    assert not marker.exists()


# --- kill -9 during training, then resume: the same result as an uninterrupted run -------------------

_KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    from mnv2lib import build_model
    from mnv2lib.engine.data import load_dataset
    from mnv2lib.engine.train import TrainConfig, train_model
    torch.set_num_threads(1)
    dataset = load_dataset("synthetic", train_size=32, test_size=16, progress=False)
    torch.manual_seed(123)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", dropout=0.2)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, eval_batch_size=16, device="cpu")
    # epoch 2 waits here, after epoch 1's checkpoint and before its own: the kill lands mid-run
    train_model(model, dataset, config, seed=0, checkpoint_path=sys.argv[1], show_progress=False,
                on_epoch=lambda record: time.sleep(600) if record["epoch"] == 2 else None)
""")


def test_kill_9_after_the_first_checkpoint_then_resume_gives_the_uninterrupted_result(tiny, tmp_path):
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, eval_batch_size=16, device="cpu")
    checkpoint = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": str(paths.PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(checkpoint)], env=env)
    try:
        deadline = time.time() + 120
        while not checkpoint.exists():
            assert child.poll() is None, "the training process ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    def run(path=None):
        torch.manual_seed(123)
        model = build_model(**TINY, dropout=0.2)
        return model, train_model(model, tiny, config, seed=0, checkpoint_path=path, show_progress=False)

    torch.manual_seed(999)  # whatever state the new process starts in
    with torch_threads(1):  # as the killed process: the same reduction order
        resumed_model, resumed = run(checkpoint)
        reference_model, reference = run()
    assert resumed.resumed_from_epoch == 1
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(reference.history)
    for (name, a), b in zip(reference_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
