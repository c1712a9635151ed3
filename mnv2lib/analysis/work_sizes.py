"""How much measuring each notebook's analysis does under each profile: one table, read by every study.

Training budgets live in the profiles (``mnv2lib.runs.profiles``); this table sets the analysis' own work
(images, seeds, repeats, plans). A budget-ladder rung (``quick_x8``) does its base profile's work; a profile
the table does not know is a ValueError naming the known ones, never a silent default.
"""
from __future__ import annotations

import copy

from ..runs.profiles import Profile, base_profile_name

_ALL = "all"  # every variant the study defines

_FULL = {
    # 01: per-layer samples, gradient batches and seeds, manifold draws
    "activations": {"gradient_batch": 128, "gradient_seeds": 8, "distribution_images": 1000,
                    "samples_per_layer": 50000, "manifold_draws": 50},
    # 03: images per source (clean, each CrossNorm variant, each corruption): every per-image statistic is kept
    "cnsn": {"images": 128},
    # 05: timed repeats per latency measurement
    "families": {"latency_repeats": 10},
    # 06: seeds of the Figure 6 comparisons ("profile": the profile's seeds) and of the sweeps ("first": one)
    "design": {"figure6_seeds": "profile", "sweep_seeds": "profile", "expand_ratios": (2, 4, 6, 8, 10),
               "widths": (0.35, 0.5, 0.75, 1.0, 1.4), "cost_widths": (0.35, 0.5, 0.75, 1.0, 1.4),
               "resolutions": (24, 32, 40, 48, 64), "latency_repeats": 10},
    # 07: variants deployed, those also lowered to ExecuTorch, and the measurement sizes
    "deployment": {"variants": _ALL, "executorch_variants": _ALL,
                   "sizes": dict(test_images=10000, corruption_images=200, severities=(1, 2, 3, 4, 5),
                                 calibration_images=512, latency_repeats=100, crossover_batch=32)},
    # 04's decomposition: the parts of each improvement trained beside the ablation ("all": every part of
    # analysis.decomposition.PARTS), with the profile's seeds or the first one
    "decomposition": {"parts": "all", "seeds": "profile"},
    # 08: heads, their input sides (the paper's), the variants, the heads also timed in ONNX Runtime
    "applications": {"heads": ("classifier", "ssdlite", "deeplabv3", "lraspp"),
                     "resolutions": {"classifier": 224, "ssdlite": 320, "deeplabv3": 513, "lraspp": 513},
                     "variants": ("baseline", "mish", "triplet", "cnsn"), "width_mult": 1.0, "latency_repeats": 10,
                     "onnx_heads": ("classifier", "ssdlite", "deeplabv3", "lraspp")},
}

WORK_SIZES: dict[str, dict[str, dict]] = {
    "smoke": {
        "activations": {"gradient_batch": 16, "gradient_seeds": 2, "distribution_images": 32,
                        "samples_per_layer": 4000, "manifold_draws": 4},
        "cnsn": {"images": 32},
        "families": {"latency_repeats": 1},
        "design": {"figure6_seeds": "profile", "sweep_seeds": "first", "expand_ratios": (2,), "widths": (0.5,),
                   "cost_widths": (0.25, 0.5), "resolutions": (24, 32), "latency_repeats": 2},
        # no ExecuTorch: lowering one smoke network takes 1-2 min (tests/test_deploy.py lowers shallow ones)
        "deployment": {"variants": ("relu6", "mish"), "executorch_variants": (),
                       "sizes": dict(test_images=64, corruption_images=8, severities=(3,), calibration_images=64,
                                     latency_repeats=5, crossover_batch=8)},
        "decomposition": {"parts": ("CrossNorm only", "SelfNorm only", "CNSN before the add"), "seeds": "profile"},
        "applications": {"heads": ("classifier", "ssdlite", "deeplabv3"),
                         "resolutions": {"classifier": 64, "ssdlite": 128, "deeplabv3": 96},
                         "variants": ("baseline", "triplet"), "width_mult": 0.35, "latency_repeats": 1,
                         "onnx_heads": ()},
    },
    "quick": {
        "activations": {"gradient_batch": 64, "gradient_seeds": 4, "distribution_images": 256,
                        "samples_per_layer": 20000, "manifold_draws": 20},
        "cnsn": {"images": 64},
        "families": {"latency_repeats": 5},
        # width 0.75 costs two quick runs: left to the full profile
        "design": {"figure6_seeds": "profile", "sweep_seeds": "first", "expand_ratios": (2, 4), "widths": (0.25,),
                   "cost_widths": (0.25, 0.5, 0.75, 1.0), "resolutions": (24, 32, 40, 48), "latency_repeats": 5},
        # fits the notebook's budget (at most 5 min on 2 cores, its own training included): ReLU6 against ReLU
        # (the same function unbounded) and Mish, whose runs the ablation trains anyway, so only ReLU is
        # trained for this notebook (SiLU and Hardswish cost a minute each here); ExecuTorch for the baseline
        # and Mish (lowering takes 20-65 s per program on this machine, in worker processes side by side); an
        # ExecuTorch int8 program slower than fp32 at batch 1 is not lowered again for batch 32 (~2 of the
        # notebook's 5 minutes, alone in this process): ONNX Runtime's crossover is timed, ExecuTorch's is the
        # full profile's
        "deployment": {"variants": ("relu6", "relu", "mish", "triplet", "cnsn"), "executorch_variants": ("relu6", "mish"),
                       "sizes": dict(test_images=2000, corruption_images=100, severities=(3,), calibration_images=256,
                                     latency_repeats=50, crossover_batch=32, relower_for_crossover=False)},
        # what the ablation's largest effect (CNSN) is made of, with both seeds: CrossNorm and SelfNorm apart
        # and CNSN before the add, 6 runs (the official CNSN row is the ablation's own runs). Every other
        # part (SelfNorm before the add, CNSN at the block input and on the shortcut, SelfNorm's gate start,
        # CNSN on large maps only, CrossNorm's modes, Triplet Attention's placements) is `make decomposition`'s: 18 more runs, ~17 min on 2 cores, beyond make reports' budget
        "decomposition": {"parts": ("CNSN after the add (official)", "CrossNorm only", "SelfNorm only",
                                    "CNSN before the add"),
                          "seeds": "profile"},
        # at most 3 min on 2 cores: the paper's sides at width 1.0; ONNX Runtime for SSDLite only (an
        # export takes 10-25 s here, DeepLabv3's the longest)
        "applications": {"heads": ("classifier", "ssdlite", "deeplabv3"),
                         "resolutions": {"classifier": 224, "ssdlite": 320, "deeplabv3": 513},
                         "variants": ("baseline", "mish", "triplet", "cnsn"), "width_mult": 1.0, "latency_repeats": 7,
                         "onnx_heads": ("ssdlite",)},
    },
    "gpu": _FULL,  # a GPU does the full sizes in seconds
    "full": _FULL,
}
STUDIES = tuple(_FULL)


def work_sizes(profile: str | Profile, study: str) -> dict:
    """A copy of ``study``'s work sizes under ``profile`` (a rung ``<name>_x<factor>`` gets its base's)."""
    if study not in STUDIES:
        raise ValueError(f"study: got {study!r}; allowed values are {STUDIES}")
    name = base_profile_name(profile)
    if name not in WORK_SIZES:
        raise ValueError(f"profile: got {name!r}; allowed values are {tuple(WORK_SIZES)} (and their budget-ladder "
                         "rungs <name>_x<factor>): add the profile to mnv2lib.analysis.work_sizes.WORK_SIZES")
    return copy.deepcopy(WORK_SIZES[name][study])
