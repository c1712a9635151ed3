"""The runs every notebook asks the results store for, without executing a notebook.

Each notebook's requests are built here from the same functions and constants the notebook
passes to ``trained_model`` / ``ensure_runs`` (``ablation_configs``, ``design_plan``,
``trainable_members``, ``TRAINED_MODELS`` ...), so ``python -m mnv2lib.experiments run`` and
``make reports`` can train the whole grid first, in parallel, and the notebooks then find every
run in the store. ``tests/test_notebooks.py`` executes the notebooks after the plan has been
trained and checks that they train nothing more: the plan cannot drift from the notebooks.

This module sits at the notebooks' layer (it reads the analysis modules); the engine's
``mnv2lib.runs.executors`` trains what it lists.
"""
from __future__ import annotations

from ..analysis import activations, attention, cnsn, decomposition, deployment, design, families
from ..runs.executors import train_runs
from ..runs.profiles import Profile, get_profile
from ..runs.runner import load_profile_dataset
from ..runs.spec import RunRequest, ablation_configs, plan_runs
from ..runs.store import ResultsStore
from .catalogue import NOTEBOOK_SEQUENCE as NOTEBOOKS


def notebook_requests(profile: str | Profile, seed: int = 0, factors=None) -> dict[str, list[RunRequest]]:
    """Per notebook (in the report sequence), the runs it asks for: ``seed`` is the notebook's
    ``seed`` parameter (notebooks 01-03 train that seed; 04-06 the profile's or the design plan's);
    ``factors``: notebook 04's ``factors`` parameter (``runs.spec.parse_factors``; None: the three improvements)."""
    profile = get_profile(profile)
    one_seed = (seed,)
    plan = design.design_plan(profile)
    parts = decomposition.decomposition_plan(profile)
    members = families.trainable_members(families.family_entries())
    return {
        "01_activation_study": [RunRequest(o, one_seed) for o in activations.TRAINED_MODELS.values()],
        "02_triplet_attention": [RunRequest(o, one_seed) for o in attention.TRAINED_MODELS.values()],
        "03_cnsn_distributions": [RunRequest(cnsn.TRAINED_MODEL, one_seed)],
        "04_ablations": ([RunRequest(o, tuple(profile.seeds)) for o in ablation_configs(factors=factors)]
                         + [RunRequest(o, parts["seeds"]) for o in decomposition.part_configs(parts)]),
        "05_mobilenet_families": [RunRequest(o, tuple(profile.seeds)) for o in members.values()],
        "06_mobilenetv2_design": ([RunRequest(o, tuple(plan.figure6_seeds)) for o in design.figure6_configs()]
                                  + [RunRequest(o, tuple(plan.sweep_seeds)) for o in design.sweep_configs(plan)]),
        "07_deployment": [RunRequest(deployment.variant_overrides(name), one_seed)
                          for name in deployment.deploy_plan(profile).variants],
        "08_applications": [],  # costs of untrained detection and segmentation networks: no run
    }


def requests_for(profile: str | Profile, seed: int = 0, notebooks=None,
                 factors=None) -> list[tuple[str, RunRequest]]:
    """(notebook, request) pairs of ``notebooks`` (default: all), in the report sequence."""
    wanted = list(notebooks or NOTEBOOKS)
    unknown = [n for n in wanted if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"notebooks: got {unknown}; allowed values are {NOTEBOOKS}")
    per_notebook = notebook_requests(profile, seed, factors)
    return [(name, request) for name in NOTEBOOKS if name in wanted for request in per_notebook[name]]


# Planned last: the reference families' runs are the plan's shortest (MobileNetV4-nano's a third of a
# MobileNetV2's), so the workers side by side run out of work together instead of one finishing a long
# run alone (a minute of an idle core on 2 cores).
_PLANNED_LAST = "05_mobilenet_families"


def plan_notebook_runs(profile: str, dataset: str = "auto", seed: int = 0, notebooks=None, factors=None):
    """(loaded dataset, planned runs) of the notebooks' requests, in the order they are trained."""
    requests = sorted(requests_for(profile, seed, notebooks, factors),
                      key=lambda pair: pair[0] == _PLANNED_LAST)  # stable: the rest in sequence
    loaded = load_profile_dataset(get_profile(profile), dataset, seed=0)  # as workbook.Session loads it
    return loaded, plan_runs(requests, profile, loaded)


def train_plan(profile: str, dataset: str = "auto", seed: int = 0, notebooks=None, store: ResultsStore | None = None,
               show_progress: bool = True, factors=None, **executor_options) -> list[dict]:
    """Train every run the notebooks will ask for that the store lacks (``mnv2lib.runs.executors``)."""
    loaded, runs = plan_notebook_runs(profile, dataset, seed, notebooks, factors)
    return train_runs(runs, profile, loaded, store, show_progress=show_progress, **executor_options)
