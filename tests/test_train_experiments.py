"""Training and the experiment store: determinism, exact resume, the NaN guard, no recomputation."""
import dataclasses
import json
import sys
from datetime import datetime

import pytest
import torch

from mnv2lib.utils import allocator
from mnv2lib import build_model
from mnv2lib.runs import profiles, runner, spec
from mnv2lib.runs.store import ResultsStore, finished, load_results
from mnv2lib.engine.data import load_dataset
from mnv2lib.models import ModelConfig
from mnv2lib.engine.train import NonFiniteLossError, TrainConfig, _train_loader, train_model

TINY = dict(num_classes=10, width_mult=0.25, stem="cifar_lite", dropout=0.2)
CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.05, eval_batch_size=128, device="cpu")
PROFILE = profiles.Profile("unit-test", train_size=96, test_size=64, corruption_test_size=32, severities=(2,),
                    corruptions=("gaussian_noise",), width_mult=0.25, stem="cifar_lite", seeds=(0,),
                    train=CONFIG)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("synthetic", train_size=96, test_size=64, progress=False)


def _metrics(history):
    return [{k: v for k, v in epoch.items() if k != "epoch_seconds"} for epoch in history]


def _train(dataset, seed=0, **kwargs):
    torch.manual_seed(123)  # the initial weights; train_model seeds everything after that
    model = build_model(**TINY, cnsn="cnsn", crossnorm_crop="both", cn_prob=1.0)
    return model, train_model(model, dataset, CONFIG, seed=seed, show_progress=False, **kwargs)


def test_same_seed_and_config_give_identical_metrics(dataset):
    a, result_a = _train(dataset)
    b, result_b = _train(dataset)
    assert _metrics(result_a.history) == _metrics(result_b.history)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_another_seed_gives_other_metrics(dataset):
    _, result_a = _train(dataset, seed=0)
    _, result_b = _train(dataset, seed=1)
    assert _metrics(result_a.history) != _metrics(result_b.history)


def test_interrupted_run_resumes_to_the_same_result(dataset, tmp_path):
    # dropout and CrossNorm draw random numbers: their states must come back from the checkpoint
    reference, full = _train(dataset)
    checkpoint = tmp_path / "checkpoint.pt"
    _, first = _train(dataset, checkpoint_path=checkpoint, stop_after_epoch=1)
    assert len(first.history) == 1 and checkpoint.exists()
    torch.manual_seed(999)  # the process state after a restart is anything
    resumed_model, resumed = _train(dataset, checkpoint_path=checkpoint)
    assert resumed.resumed_from_epoch == 1
    assert _metrics(resumed.history) == _metrics(full.history)
    for (name, pa), pb in zip(reference.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_a_checkpoint_of_another_config_is_refused(dataset, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    _train(dataset, checkpoint_path=checkpoint, stop_after_epoch=1)
    model = build_model(**TINY)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train_model(model, dataset, dataclasses.replace(CONFIG, lr=0.01), checkpoint_path=checkpoint,
                    show_progress=False)


def test_non_finite_loss_stops_the_run(dataset):
    model = build_model(**TINY)
    with pytest.raises(NonFiniteLossError, match="lower lr"):
        train_model(model, dataset, dataclasses.replace(CONFIG, lr=1e30), show_progress=False)


def test_training_data_is_shuffled_also_without_augmentation(dataset):
    config = dataclasses.replace(CONFIG, batch_size=32, augment=False, channels_last=False)
    plain = _train_loader(dataset.train_images, dataset.train_labels, dataset, config, seed=0, device="cpu")
    (_, labels_a), (_, labels_b) = next(iter(plain)), next(iter(
        _train_loader(dataset.train_images, dataset.train_labels, dataset, config, seed=1, device="cpu")))
    assert not torch.equal(labels_a, dataset.train_labels[:32]) or not torch.equal(labels_b, dataset.train_labels[:32])
    assert not torch.equal(labels_a, labels_b)
    x, _ = next(iter(plain))
    order = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(0))[:32]
    reference = (dataset.train_images[order].float() / 255 - torch.tensor(dataset.mean).view(1, 3, 1, 1)) \
        / torch.tensor(dataset.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, reference, atol=1e-5, rtol=1e-5)  # no crop, no flip


def test_run_experiment_records_once_and_reads_back(dataset, tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    config = spec.model_config_for({"activation": "relu"}, PROFILE, 10)
    record = runner.run_experiment(config, PROFILE, dataset, seed=0, store=store, show_progress=False)
    assert record["status"] == "finished" and len(record["history"]) == CONFIG.epochs
    assert 0.0 <= record["clean_accuracy"] <= 1.0
    assert set(record["corruption_accuracy"]) == {"gaussian_noise"}
    assert record["allocator"] == allocator.mode()  # the process that trained kept its freed memory:
    assert record["allocator"] == "steady" or allocator.requested() == "system" or sys.platform != "linux"
    assert record["costs"]["parameters"] == sum(p.numel() for p in build_model(config).parameters())
    assert json.loads(store.record_path(record["key"]).read_text())["key"] == record["key"]
    assert not list((tmp_path / "results").glob(".*.tmp"))  # written atomically
    assert not (store.run_dir(record["key"]) / "checkpoint.pt").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train_model", no_training)
    again = runner.run_experiment(config, PROFILE, dataset, seed=0, store=store, show_progress=False)
    assert again == json.loads(json.dumps(record, default=str))
    frame = load_results(store)
    assert list(frame["key"]) == [record["key"]] and frame["activation"].iloc[0] == "relu"
    wall = (datetime.fromisoformat(record["finished"]) - datetime.fromisoformat(record["started"])).total_seconds()
    assert frame["wall_seconds"].iloc[0] == wall >= 0
    model = runner.load_trained_model(record, store)
    assert not model.training


def test_interrupted_experiment_resumes_and_ends_like_an_uninterrupted_one(dataset, tmp_path):
    config = spec.model_config_for({}, PROFILE, 10)
    straight = runner.run_experiment(config, PROFILE, dataset, 0, ResultsStore(tmp_path / "a", tmp_path / "ra"),
                                show_progress=False)
    store = ResultsStore(tmp_path / "b", tmp_path / "rb")
    partial = runner.run_experiment(config, PROFILE, dataset, 0, store, show_progress=False, stop_after_epoch=1)
    assert partial["status"] == "running" and store.get(partial["key"]) is None
    resumed = runner.run_experiment(config, PROFILE, dataset, 0, store, show_progress=False)
    assert resumed["resumed_from_epoch"] == 1
    assert _metrics(resumed["history"]) == _metrics(straight["history"])
    assert resumed["corruption_accuracy"] == straight["corruption_accuracy"]


def test_a_diverging_run_is_recorded_as_failed_and_left_out(dataset, tmp_path, capsys):
    profile = dataclasses.replace(PROFILE, train=dataclasses.replace(CONFIG, lr=1e30))
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    record = runner.run_experiment(spec.model_config_for({}, profile, 10), profile, dataset, 0, store, show_progress=False)
    assert record["status"] == "failed" and "lower lr" in record["error"]
    assert store.get(record["key"])["status"] == "failed"
    assert finished([record]) == []
    assert "left out of the tables" in capsys.readouterr().out


def test_run_key_changes_with_every_part_of_a_run(dataset):
    identity = spec.dataset_identity(dataset)
    config = spec.model_config_for({}, PROFILE, 10)
    key = spec.run_key(config, PROFILE, identity, 0)
    assert key == spec.run_key(ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))), PROFILE, identity, 0)
    others = [spec.run_key(config, PROFILE, identity, 1),
              spec.run_key(spec.model_config_for({"activation": "mish"}, PROFILE, 10), PROFILE, identity, 0),
              spec.run_key(config, dataclasses.replace(PROFILE, train=dataclasses.replace(CONFIG, epochs=3)),
                        identity, 0),
              spec.run_key(config, PROFILE, {**identity, "name": "cifar10"}, 0)]
    assert len({key, *others}) == 5
