"""Profiles: how much to train and evaluate, a budget chosen for a machine (smoke, quick, gpu, full),
and the budget ladder's rungs made from them."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..engine.train import TrainConfig


@dataclass(frozen=True)
class Profile:
    """How much to train and evaluate: a budget, chosen for a machine."""

    name: str
    train_size: int | None            # training images (class-balanced subset); None = all
    test_size: int | None             # clean test images; None = all
    corruption_test_size: int         # test images per corruption set
    severities: tuple = (1, 2, 3, 4, 5)
    corruptions: tuple | None = None  # None = all 15
    width_mult: float = 0.5
    stem: str = "cifar"
    seeds: tuple = (0, 1)
    train: TrainConfig = field(default_factory=TrainConfig)
    cost_input_size: int = 32         # input side for latency and memory measurements
    cost_train_batch: int | None = None  # batch of the CPU training-step cost measurement (None: the training batch)
    cost_repeats: int = 3             # timed repeats per cost measurement (1: seconds, for tests)
    dropout: float | None = None      # classifier dropout of every model (None: the model's default, 0.2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d


QUICK_TRAIN_SIZE = 20000
QUICK_TRAIN = dict(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500, channels_last=True,
                   zero_init_residual=True, augment=False)

PROFILES: dict[str, Profile] = {
    # seconds: for tests and for checking that every notebook runs end to end
    "smoke": Profile("smoke", train_size=256, test_size=128, corruption_test_size=64, severities=(3,),
                     corruptions=("gaussian_noise", "defocus_blur", "contrast"), width_mult=0.25, stem="cifar_lite",
                     seeds=(0, 1), cost_repeats=1,
                     train=TrainConfig(epochs=1, batch_size=64, lr=0.05, eval_batch_size=256)),
    # the whole 2^3 ablation, 2 seeds, on a 2-core CPU in at most half an hour (docs/runs-and-profiles.md: "Profiles").
    # The recipe was chosen by validation accuracy per CPU-second (python -m mnv2lib.benchmarks.recipes, docs/runs-and-profiles.md:
    # "Choosing the quick recipe"): distinct images rather than repeated epochs, zero-initialized residual
    # BN scales, no augmentation at a budget where no image is seen twice.
    "quick": Profile("quick", train_size=QUICK_TRAIN_SIZE, test_size=None, corruption_test_size=200, width_mult=0.5,
                     stem="cifar_lite", seeds=(0, 1),
                     train=TrainConfig(**QUICK_TRAIN)),
    # the papers' regime on one H100/H200-class GPU: the 8 ablation variants x 1 seed in about twelve
    # minutes (docs/runs-and-profiles.md: "GPU profile"). Data lives on the GPU as uint8 and is augmented there; bf16
    # autocast, channels_last, batch 512 with a warm-up, no per-step host syncs.
    "gpu": Profile("gpu", train_size=None, test_size=None, corruption_test_size=1000, width_mult=1.0,
                   stem="cifar", seeds=(0,), cost_train_batch=64,
                   train=TrainConfig(epochs=15, batch_size=512, lr=0.4, warmup_fraction=0.15, eval_batch_size=1000,
                                     channels_last=True, zero_init_residual=True, amp_dtype="bfloat16")),
    # paper-like CIFAR-10 training, for a GPU
    "full": Profile("full", train_size=None, test_size=None, corruption_test_size=10000, width_mult=1.0,
                    stem="cifar", seeds=(0, 1, 2),
                    train=TrainConfig(epochs=200, batch_size=128, lr=0.1, eval_batch_size=1000, channels_last=True)),
}


def budget_rung(profile: Profile, factor: int, max_train_size: int = 50_000) -> Profile:
    """``profile`` with ``factor`` times its training budget, named ``<name>_x<factor>``: more distinct
    images while the training set (``max_train_size``) allows, then more epochs; one seed."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: got {factor!r}; allowed values are integers >= 1")
    size, epochs = (profile.train_size or max_train_size) * factor, profile.train.epochs
    while size > max_train_size and size % 2 == 0:
        size, epochs = size // 2, epochs * 2
    return dataclasses.replace(profile, name=f"{profile.name}_x{factor}", train_size=size, seeds=(0,),
                               train=dataclasses.replace(profile.train, epochs=epochs))


def base_profile_name(profile: str | Profile) -> str:
    """The name of the profile a budget-ladder rung (``<name>_x<factor>``) was made from; other
    profiles' own names. Work sizes and plans keyed by profile use it, so a rung does its base's work."""
    name = getattr(profile, "name", profile)
    if isinstance(name, str) and re.fullmatch(r"\w+_x\d+", name):
        return name.rsplit("_x", 1)[0]
    return name


# The budget ladder (notebook 04): the quick budget, and 2x and 4x it for the baseline and each single
# improvement; `make ladder` trains the upper rungs (outside `make reports`' budget).
LADDER_FACTORS = (2, 4)
for _factor in LADDER_FACTORS:
    _rung = budget_rung(PROFILES["quick"], _factor)
    PROFILES[_rung.name] = _rung


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile: got {profile!r}; allowed values are {tuple(PROFILES)}")
    return PROFILES[profile]


