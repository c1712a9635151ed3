"""What a run is: build_model overrides under a profile, a dataset and a seed, and the key that names it.

A run key hashes all four (and RECORD_VERSION), so the same run is the same record in every notebook.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

from ..models import ModelConfig
from ..utils.checks import check_int, plain_number, plain_numbers
from .profiles import Profile, get_profile

RECORD_VERSION = 1


IMPROVEMENTS = {"mish": dict(activation="mish"), "triplet": dict(attention="triplet"), "cnsn": dict(cnsn="cnsn")}
DEFAULT_FACTORS = ",".join(IMPROVEMENTS)  # the ablation's factors when none are named
CNSN_FACTORS = ("cn", "sn", "cnsn")


def parse_factors(factors=None) -> dict[str, dict]:
    """The ablation's factors as ``{name: build_model overrides that switch it on}``, from a
    comma-separated string or a list of names (None: the three improvements). A name is one of the
    improvements, a CNSN part (``cn``, ``sn``), or any activation or attention in the layers' registries
    (``register_activation`` / ``register_attention``, also those a ``MNV2_PLUGINS`` module registers);
    a dict passes through, checked. Two factors that set the same option cannot be crossed: refused."""
    from ..layers.activations import activation_names
    from ..layers.attention import attention_names

    if factors is None:
        factors = DEFAULT_FACTORS
    if isinstance(factors, str):
        factors = [f.strip() for f in factors.split(",") if f.strip()]
    if isinstance(factors, dict):
        table = {str(k): dict(v) for k, v in factors.items()}
    else:
        table = {}
        for name in factors:
            if name in table:
                raise ValueError(f"factors: got {name!r} twice; allowed: each factor once")
            if name in IMPROVEMENTS:
                table[name] = dict(IMPROVEMENTS[name])
            elif name in CNSN_FACTORS:
                table[name] = {"cnsn": name}
            elif name in attention_names():
                table[name] = {"attention": name}
            elif name in activation_names() and name != "relu6":
                table[name] = {"activation": name}
            else:
                raise ValueError(f"factors: got {name!r}; allowed: {tuple(IMPROVEMENTS)}, {CNSN_FACTORS[:2]}, an "
                                 f"attention {attention_names()} or an activation {activation_names()} (register "
                                 "your own with register_attention / register_activation)")
    if not table:
        raise ValueError("factors: got none; allowed: one or more factor names, e.g. mish,triplet,cnsn")
    seen: dict[str, str] = {}
    for name, overrides in table.items():
        for option in overrides:
            if option in seen:
                raise ValueError(f"factors: {seen[option]!r} and {name!r} both set {option!r}; allowed: factors that "
                                 "can be switched on together (one per option)")
            seen[option] = name
    return table


def ablation_configs(base: dict | None = None, factors=None) -> list[dict]:
    """The 2^k model-config overrides of the ablation over ``factors`` (see :func:`parse_factors`; default:
    the 2^3 of the three improvements), baseline first."""
    table = parse_factors(factors)
    names = list(table)
    configs = []
    for mask in range(2 ** len(names)):
        overrides = dict(base or {})
        for i, name in enumerate(names):
            if mask >> i & 1:
                overrides.update(table[name])
        configs.append(overrides)
    return sorted(configs, key=lambda c: (len([k for k in c if k not in (base or {})]), str(sorted(c.items()))))


def model_config_for(overrides: dict, profile: Profile, num_classes: int) -> ModelConfig:
    """Profile defaults (width, stem) < the overrides; num_classes from the dataset."""
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides: got {overrides!r}; allowed: a dict of ModelConfig fields")
    overrides = plain_numbers(overrides)
    if "num_classes" in overrides and overrides["num_classes"] != num_classes:  # it would be overwritten silently
        raise ValueError(f"num_classes: got {overrides['num_classes']!r}, but the dataset has {num_classes} classes; "
                         "allowed: leave it out (the dataset's count is used)")
    fields = {"width_mult": profile.width_mult, "stem": profile.stem, **overrides, "num_classes": num_classes}
    if profile.dropout is not None:
        fields.setdefault("dropout", profile.dropout)
    return ModelConfig.from_dict(fields)  # an unknown field is named with the allowed ones


@dataclass(frozen=True)
class RunRequest:
    """What a notebook asks the store for: build_model overrides, trained with each of ``seeds``."""

    overrides: dict
    seeds: tuple

    def __post_init__(self) -> None:  # np.int64(0) and 0: one run
        object.__setattr__(self, "seeds", tuple(check_seed(s) for s in self.seeds))


@dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: its store key, model config and seed, and the notebooks that read it."""

    key: str
    model_config: ModelConfig
    seed: int
    notebooks: tuple = ()

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.model_config.label, "seed": self.seed,
                "notebooks": list(self.notebooks), "model_config": self.model_config.to_dict()}


def plan_runs(requests: Iterable, profile: str | Profile, dataset) -> list[PlannedRun]:
    """The distinct runs of ``requests`` ((notebook, RunRequest) pairs, or bare RunRequests) for a
    profile and a loaded dataset, in request order; a run several notebooks share appears once."""
    profile = get_profile(profile)
    identity, classes = dataset_identity(dataset), len(dataset.classes)
    runs: dict[str, PlannedRun] = {}
    for item in requests:
        notebook, request = item if isinstance(item, tuple) else (None, item)
        config = model_config_for(request.overrides, profile, classes)
        for seed in map(check_seed, request.seeds):
            key = run_key(config, profile, identity, seed)
            known = runs.get(key)
            notebooks = (known.notebooks if known else ()) + ((notebook,) if notebook else ())
            runs[key] = PlannedRun(key, config, seed, tuple(dict.fromkeys(notebooks)))
    return list(runs.values())


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def check_seed(seed) -> int:
    """``seed`` as a Python int (numpy integers included); a ValueError naming it otherwise (a bool too)."""
    seed = plain_number(seed)
    check_int("seed", seed)
    return seed


def run_key(model_config: ModelConfig, profile: Profile, dataset_identity: dict, seed: int) -> str:
    seed = check_seed(seed)  # _canonical would write np.int64(0) as "0": another key for the same run
    payload = {"model": model_config.to_dict(), "profile": {**profile.training_dict(), "seeds": None},
               "dataset": dataset_identity, "seed": seed, "version": RECORD_VERSION}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def dataset_identity(dataset) -> dict:
    return {"name": dataset.name, "train_size": len(dataset.train_labels), "test_size": len(dataset.test_labels),
            "classes": len(dataset.classes)}

