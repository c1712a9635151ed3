"""The GPU profile's code path, at tiny size on the CPU: same profile structure, a few steps."""
import dataclasses

import pytest
import torch

from mnv2lib import build_model
from mnv2lib.runs import profiles, runner, spec
from mnv2lib.runs.store import ResultsStore
from mnv2lib.engine.data import load_dataset
from mnv2lib.engine.train import TrainConfig, train_model


def tiny(profile: profiles.Profile) -> profiles.Profile:
    """``profile`` with its recipe kept (batch/lr ratio, warm-up, bf16, channels_last, zero-init, stem)
    and its sizes cut to seconds."""
    return dataclasses.replace(
        profile, name=f"{profile.name}-tiny", train_size=64, test_size=32, corruption_test_size=16, severities=(3,),
        corruptions=("gaussian_noise",), width_mult=0.25, cost_train_batch=8, cost_repeats=1,
        train=dataclasses.replace(profile.train, epochs=2, batch_size=16, lr=profile.train.lr * 16 / profile.train.batch_size,
                                  eval_batch_size=32))


def test_gpu_profile_is_the_papers_regime():
    gpu = profiles.PROFILES["gpu"]
    assert gpu.train_size is None and gpu.test_size is None  # every training and test image
    assert gpu.width_mult == 1.0 and gpu.stem == "cifar" and gpu.train.augment
    assert gpu.train.channels_last and gpu.train.amp and gpu.train.amp_dtype == "bfloat16"


@pytest.mark.parametrize("overrides", [{}, {"activation": "mish", "attention": "triplet", "cnsn": "cnsn"}],
                         ids=["baseline", "all-three"])
def test_gpu_profile_code_path_runs_on_cpu_at_tiny_size(overrides, tmp_path):
    profile = tiny(profiles.PROFILES["gpu"])
    dataset = load_dataset("synthetic", train_size=64, test_size=32, progress=False)
    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    config = spec.model_config_for(overrides, profile, dataset.num_classes)
    record = runner.run_experiment(config, profile, dataset, seed=0, store=store, show_progress=False)
    assert record["status"] == "finished" and len(record["history"]) == 2
    assert record["profile"]["train"]["zero_init_residual"] and record["costs"]["parameters"] > 0
    model = runner.load_trained_model(record, store)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_training_makes_a_constant_number_of_host_syncs_per_epoch(monkeypatch):
    """No .item()/bool()/float() on a tensor per step: on a GPU each would stall the pipeline."""
    dataset = load_dataset("synthetic", train_size=128, test_size=32, progress=False)
    calls = {"n": 0}
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)

    def syncs(batch_size):
        calls["n"] = 0
        torch.manual_seed(0)
        model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
        train_model(model, dataset, TrainConfig(epochs=1, batch_size=batch_size, eval_batch_size=32, device="cpu"),
                    show_progress=False)
        return calls["n"]

    # 2 steps or 8 steps per epoch: the same number of syncs
    assert syncs(64) == syncs(16)
