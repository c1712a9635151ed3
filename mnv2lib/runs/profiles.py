"""Profiles: how much to train and evaluate, a budget chosen for a machine (smoke, quick, gpu, full),
and the budget ladder's rungs made from them."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..engine.train import TrainConfig
from ..utils.checks import plain_number, plain_numbers


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
    # learning curves: class-balanced training images held out of the train_size ones (never the test set)
    # and evaluated at train.curve_points moments of every run; evaluation only, so not in the run key
    validation_size: int = 0

    def __post_init__(self) -> None:  # numpy numbers as Python ones: the run key hashes to_dict()
        for f in dataclasses.fields(self):
            if f.name != "train":
                object.__setattr__(self, f.name, plain_numbers(getattr(self, f.name)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d

    def training_dict(self) -> dict:
        """:meth:`to_dict` without the evaluation-only settings (the learning curves' validation size and
        points): what decides a run's training, so what its key hashes. A curve changes no weight."""
        d = self.to_dict()
        d.pop("validation_size")
        d["train"].pop("curve_points")
        return d


QUICK_TRAIN_SIZE = 20000
QUICK_TRAIN = dict(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500, channels_last=True,
                   zero_init_residual=True, augment=False, curve_points=10)

PROFILES: dict[str, Profile] = {
    # seconds: for tests and for checking that every notebook runs end to end
    "smoke": Profile("smoke", train_size=256, test_size=128, corruption_test_size=64, severities=(3,),
                     corruptions=("gaussian_noise", "defocus_blur", "contrast"), width_mult=0.25, stem="cifar_lite",
                     seeds=(0, 1), cost_repeats=1, validation_size=64,
                     train=TrainConfig(epochs=1, batch_size=64, lr=0.05, eval_batch_size=256, curve_points=4)),
    # the whole 2^3 ablation, 2 seeds, on a 2-core CPU in at most half an hour (docs/runs-and-profiles.md: "Profiles").
    # The recipe: first chosen on the baseline's validation accuracy per CPU-second, then checked by the fair
    # search (python -m mnv2lib.benchmarks.recipes, docs/runs-and-profiles.md: "Choosing the quick recipe fairly"):
    # the best mean validation accuracy of the baseline and each single improvement over its grid. Distinct
    # images rather than repeated epochs, zero-initialized residual BN scales, no augmentation at a budget
    # where no image is seen more than twice.
    "quick": Profile("quick", train_size=QUICK_TRAIN_SIZE, test_size=None, corruption_test_size=200, width_mult=0.5,
                     stem="cifar_lite", seeds=(0, 1), validation_size=1000,
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
    factor = plain_number(factor)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: got {factor!r}; allowed values are integers >= 1")
    size, epochs = (profile.train_size or max_train_size) * factor, profile.train.epochs
    limit = max_train_size - profile.validation_size  # the learning curves' images are held out of training
    while size > limit and size % 2 == 0:
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


# The budget ladder (notebook 04): the quick budget, and 2x to 16x it for the baseline and each single
# improvement; `make ladder` trains the upper rungs (outside `make reports`' budget).
LADDER_FACTORS = (2, 4, 8, 16)
for _factor in LADDER_FACTORS:
    _rung = budget_rung(PROFILES["quick"], _factor)
    PROFILES[_rung.name] = _rung


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"profile: got {profile!r}; allowed values are {tuple(PROFILES)}")
    return PROFILES[profile]


# Profiles sized for a GPU: without one, "auto" trains them on the CPU for hours to days.
GPU_PROFILES = ("gpu", "full")
# The quick profile's design budget (its entry above): its 16-run ablation in about half an hour on a
# 2-core CPU. A reference to scale from, not a measurement of this machine.
QUICK_BUDGET_SECONDS_PER_RUN = 30 * 60 / 16


def training_images(profile: Profile, dataset_train_size: int = 50_000) -> int:
    """Images one run of ``profile`` trains on (epochs x training set; CIFAR's 50,000 where it takes all)."""
    return (profile.train_size or dataset_train_size) * profile.train.epochs


def cpu_seconds_per_run(profile: str | Profile) -> float:
    """A rough CPU time of one run: the quick profile's budget per run, scaled by training images x
    multiply-adds per image of the profile's baseline model."""
    from ..engine.measure import multiply_adds
    from ..models import ModelConfig, build_model

    def work(p: Profile) -> float:
        model = build_model(ModelConfig(num_classes=10, width_mult=p.width_mult, stem=p.stem))
        return training_images(p) * multiply_adds(model, (1, 3, p.cost_input_size, p.cost_input_size))

    return QUICK_BUDGET_SECONDS_PER_RUN * work(get_profile(profile)) / work(PROFILES["quick"])


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    return f"{hours:.1f} hours" if hours >= 1 else f"{seconds / 60:.0f} min"


def check_device_for(profile: str | Profile, allow_cpu: bool = False, runs: int | None = None) -> None:
    """A ValueError (before any loading) when a GPU profile would train on the CPU of a machine without
    CUDA, naming roughly how long that takes; ``allow_cpu`` (the command lines' --allow-cpu) lets it."""
    import torch

    profile = get_profile(profile)
    if (allow_cpu or base_profile_name(profile) not in GPU_PROFILES or profile.train.device != "auto"
            or torch.cuda.is_available()):
        return
    per_run = cpu_seconds_per_run(profile)
    total = f" ({runs} runs: about {_duration(per_run * runs)})" if runs and runs > 1 else ""
    raise ValueError(
        f"profile: got {profile.name!r}, sized for a GPU, but torch sees no CUDA device here; on the CPU each run "
        f"would train {training_images(profile):,} images ({profile.train.epochs} epochs of "
        f"{profile.train_size or 50_000:,}) at width {profile.width_mult:g}: roughly {_duration(per_run)} per run"
        f"{total}, scaled from the quick profile's budget (its 16 runs in about half an hour on a 2-core CPU). "
        "Allowed: a machine with a GPU, --profile quick, or --allow-cpu (allow_cpu=True) to train on the CPU anyway")
