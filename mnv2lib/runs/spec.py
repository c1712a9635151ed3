"""What a run is: build_model overrides under a profile, a dataset and a seed, and the key that names it.

A run key hashes all four (and RECORD_VERSION), so the same run is the same record in every notebook.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

from ..models import ModelConfig
from .profiles import Profile, get_profile

RECORD_VERSION = 1


IMPROVEMENTS = {"mish": dict(activation="mish"), "triplet": dict(attention="triplet"), "cnsn": dict(cnsn="cnsn")}


def ablation_configs(base: dict | None = None) -> list[dict]:
    """The eight model-config overrides of the 2^3 ablation, baseline first."""
    names = list(IMPROVEMENTS)
    configs = []
    for mask in range(2 ** len(names)):
        overrides = dict(base or {})
        for i, name in enumerate(names):
            if mask >> i & 1:
                overrides.update(IMPROVEMENTS[name])
        configs.append(overrides)
    return sorted(configs, key=lambda c: (len([k for k in c if k not in (base or {})]), str(sorted(c.items()))))


def model_config_for(overrides: dict, profile: Profile, num_classes: int) -> ModelConfig:
    """Profile defaults (width, stem) < the overrides; num_classes from the dataset."""
    fields = {"width_mult": profile.width_mult, "stem": profile.stem, **overrides, "num_classes": num_classes}
    if profile.dropout is not None:
        fields.setdefault("dropout", profile.dropout)
    return ModelConfig(**fields)


@dataclass(frozen=True)
class RunRequest:
    """What a notebook asks the store for: build_model overrides, trained with each of ``seeds``."""

    overrides: dict
    seeds: tuple


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
        for seed in request.seeds:
            key = run_key(config, profile, identity, seed)
            known = runs.get(key)
            notebooks = (known.notebooks if known else ()) + ((notebook,) if notebook else ())
            runs[key] = PlannedRun(key, config, seed, tuple(dict.fromkeys(notebooks)))
    return list(runs.values())


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(model_config: ModelConfig, profile: Profile, dataset_identity: dict, seed: int) -> str:
    payload = {"model": model_config.to_dict(), "profile": {**profile.to_dict(), "seeds": None},
               "dataset": dataset_identity, "seed": seed, "version": RECORD_VERSION}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def dataset_identity(dataset) -> dict:
    return {"name": dataset.name, "train_size": len(dataset.train_labels), "test_size": len(dataset.test_labels),
            "classes": len(dataset.classes)}

