"""Learning curves on a validation set held out of the training pool: evaluation only (same weights,
same run key), evenly spaced, kept across a resume, and plotted."""
from __future__ import annotations

import dataclasses

import torch

from mnv2lib import build_model
from mnv2lib.analysis import ablation
from mnv2lib.engine.data import load_dataset, split_validation
from mnv2lib.engine.train import TrainConfig, train_model
from mnv2lib.figures import ablation as figures
from mnv2lib.runs import profiles, runner, spec

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, eval_batch_size=32, device="cpu", curve_points=5)


def _data():
    return split_validation(load_dataset("synthetic", train_size=96, test_size=32, progress=False), 64)


def _train(config, **kwargs):
    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
    return model, train_model(model, _data(), config, seed=0, show_progress=False, **kwargs)


def test_the_validation_split_is_the_same_training_set():
    held = _data()
    plain = load_dataset("synthetic", train_size=64, test_size=32, progress=False)
    assert torch.equal(held.train_images, plain.train_images) and held.mean == plain.mean
    assert len(held.validation_labels) == 32 and spec.dataset_identity(held) == spec.dataset_identity(plain)


def test_curves_are_evenly_spaced_and_change_no_weight():
    with_curve, result = _train(CONFIG)
    without, plain = _train(dataclasses.replace(CONFIG, curve_points=0))
    assert [p["step"] for p in result.curve] == [2, 3, 5, 6, 8]  # 8 steps in all, 5 points
    assert result.curve[-1]["images_seen"] == 8 * 16 and plain.curve == []
    assert all(torch.equal(a, b) for a, b in zip(with_curve.state_dict().values(), without.state_dict().values()))


def test_a_resumed_run_keeps_its_curve(tmp_path):
    _, stopped = _train(CONFIG, checkpoint_path=tmp_path / "c.pt", stop_after_epoch=1)
    _, resumed = _train(CONFIG, checkpoint_path=tmp_path / "c.pt")
    _, whole = _train(CONFIG)
    assert len(stopped.curve) == 2 and [p["step"] for p in resumed.curve] == [p["step"] for p in whole.curve]
    assert [p["validation_accuracy"] for p in resumed.curve] == [p["validation_accuracy"] for p in whole.curve]


def test_evaluation_settings_stay_out_of_the_run_key():
    quick = profiles.get_profile("quick")
    config = spec.model_config_for({}, quick, 10)
    identity = {"name": "cifar10", "train_size": 20000, "test_size": 5000, "classes": 10}
    other = dataclasses.replace(quick, validation_size=0, train=dataclasses.replace(quick.train, curve_points=0))
    assert spec.run_key(config, quick, identity, 0) == spec.run_key(config, other, identity, 0)


def test_a_smoke_run_records_its_curve_and_the_figure_draws_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "measure_config_costs", lambda *a, **k: {})
    smoke = profiles.get_profile("smoke")
    dataset = runner.load_profile_dataset(smoke, "synthetic")
    store = runner.ResultsStore(tmp_path / "results", tmp_path / "runs")
    record = runner.run_experiment(spec.model_config_for({}, smoke, 10), smoke, dataset, 0, store, show_progress=False)
    assert len(record["curve"]) == smoke.train.curve_points
    assert (store.run_dir(record["key"]) / "history.csv").exists()
    curves = ablation.curves_frame([record])
    fig = figures.make_training_curves_figure(curves, x="images_seen", y="validation_accuracy")
    assert fig.axes[0].get_xlabel() == "training images seen"
