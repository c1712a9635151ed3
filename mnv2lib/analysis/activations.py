"""The activation study (notebook 01): curves and derivatives, the paper's spiral experiment
(why the bottleneck is linear), gradient norms at initialization, and the distributions of a
trained network's activation outputs, with the sentences that report them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..layers.activations import activation_names, get_activation_class, mish_reference
from ..utils.progress import progress
from .work_sizes import work_sizes as _work_sizes

# The trained models notebook 01 compares (build_model overrides); the run plan
# (mnv2lib.workbook.plan) trains the same ones before the notebook runs.
TRAINED_MODELS = {"relu6": {}, "mish": {"activation": "mish"}}

# ---------------------------------------------------------------------------------------------
# 1. The functions and their derivatives
# ---------------------------------------------------------------------------------------------

# Twice-differentiable reference definitions (autograd goes through them twice). The fast
# ``mnv2lib.layers.activations.mish`` is once-differentiable by design, so Mish uses the
# textbook x * tanh(softplus(x)).
REFERENCE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu6": nn.functional.relu6,
    "relu": torch.relu,
    "mish": mish_reference,
    "silu": lambda x: x * torch.sigmoid(x),
    "hardswish": lambda x: x * nn.functional.relu6(x + 3.0) / 6.0,
    "identity": lambda x: x,
}
DISPLAY_NAMES = {"relu6": "ReLU6", "relu": "ReLU", "mish": "Mish", "silu": "SiLU", "hardswish": "Hardswish",
                 "identity": "identity (linear)", "gelu": "GELU"}
CURVE_ACTIVATIONS = ("relu6", "relu", "mish", "silu", "hardswish")


def display_name(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def _check_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in REFERENCE_ACTIVATIONS]
    if unknown:
        raise ValueError(f"activation: got {unknown[0]!r}; allowed values are {tuple(REFERENCE_ACTIVATIONS)}")
    return names


def derivatives(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f(x), f'(x), f''(x)) of an activation by autograd on its reference definition.

    Piecewise-linear functions (ReLU, ReLU6, identity) get f'' = 0 away from their kinks,
    where the true second derivative is a Dirac impulse that no sampled curve can show.
    """
    (name,) = _check_names([name])
    x = x.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        y = REFERENCE_ACTIVATIONS[name](x)
        (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        if dy.requires_grad:
            (d2y,) = torch.autograd.grad(dy.sum(), x, allow_unused=True)
            d2y = torch.zeros_like(x) if d2y is None else d2y
        else:  # constant slope: the identity
            d2y = torch.zeros_like(x)
    return y.detach(), dy.detach(), d2y.detach()


def activation_curves(names: Iterable[str] = CURVE_ACTIVATIONS, low: float = -6.0, high: float = 8.0,
                      points: int = 2801) -> dict[str, dict[str, np.ndarray]]:
    """Per activation: x and f, f', f'' on a grid (numpy arrays, float64)."""
    x = torch.linspace(low, high, points, dtype=torch.float64)
    curves = {}
    for name in _check_names(names):
        f, df, d2f = derivatives(name, x)
        curves[name] = {"x": x.numpy(), "f": f.numpy(), "df": df.numpy(), "d2f": d2f.numpy()}
    return curves


def curve_properties(curves: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Per activation, what the curves show: minimum (and where), share of the plotted interval with
    zero gradient, whether it is monotone, the gradient's range, the largest |f''|."""
    rows = []
    for name, c in curves.items():
        x, f, df, d2f = c["x"], c["f"], c["df"], c["d2f"]
        i = int(np.argmin(f))
        rows.append({"activation": name, "minimum": float(f[i]), "x_of_minimum": float(x[i]),
                     "zero_gradient_fraction": float(np.mean(np.abs(df) < 1e-12)),
                     "monotone": bool(np.all(df >= -1e-12)), "min_gradient": float(df.min()),
                     "max_gradient": float(df.max()), "max_abs_second": float(np.abs(d2f).max()),
                     "low": float(x[0]), "high": float(x[-1])})
    return pd.DataFrame(rows).set_index("activation")


# ---------------------------------------------------------------------------------------------
# 2. The paper's Figure 1: a spiral through a random expansion, an activation, and back
# ---------------------------------------------------------------------------------------------

MANIFOLD_DIMS = (2, 3, 5, 15, 30)
MANIFOLD_ACTIVATIONS = ("identity", "relu", "relu6", "mish")


def spiral(points: int = 600, turns: float = 1.5, radius: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D Archimedean spiral centred on the origin: ((points, 2) coordinates, the position along
    it in [0, 1]). ``radius`` is the outer radius: at 8, ReLU6's clipping at 6 is visible."""
    s = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    angle = 2 * math.pi * turns * s
    r = radius * (0.05 + 0.95 * s)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1), s


def random_embedding(n: int, seed: int) -> torch.Tensor:
    """T: an (n, 2) matrix of independent standard normal entries."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64)


def manifold_transform(points: torch.Tensor, activation: str, embedding: torch.Tensor) -> torch.Tensor:
    """T^+ f(T x) for every point x (rows of ``points``)."""
    (activation,) = _check_names([activation])
    return REFERENCE_ACTIVATIONS[activation](points @ embedding.T) @ torch.linalg.pinv(embedding).T


def locally_invertible(points: torch.Tensor, activation: str, embedding: torch.Tensor,
                       tolerance: float = 0.01) -> torch.Tensor:
    """Per point, whether x -> f(T x) keeps both directions of the plane: the smallest singular value of
    its Jacobian diag(f'(T x)) T is at least ``tolerance`` times that of T (no direction is crushed
    more than 1/tolerance-fold beyond what T itself does). Where it holds, x can be recovered from
    f(T x) nearby; where it fails, a neighbourhood of the spiral is flattened onto a line or a point."""
    _, slope, _ = derivatives(activation, points @ embedding.T)           # (N, n)
    jacobians = slope[:, :, None] * embedding[None]                        # (N, n, 2)
    gram = jacobians.transpose(1, 2) @ jacobians                           # (N, 2, 2): J^T J
    a, b, c = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    smallest_eigenvalue = (a + c) / 2 - torch.sqrt(((a - c) / 2) ** 2 + b ** 2)  # of a 2x2 symmetric matrix
    smallest = smallest_eigenvalue.clamp_min(0).sqrt()
    return smallest >= tolerance * torch.linalg.svdvals(embedding)[-1]


def readout_error(points: torch.Tensor, outputs: torch.Tensor) -> float:
    """Fraction of the spiral's variance that no affine map of ``outputs`` recovers (1 - R^2 of the
    least-squares fit points ~ A outputs + b): 0 when the output is the spiral up to a linear map."""
    design = torch.cat([outputs, torch.ones(len(outputs), 1, dtype=outputs.dtype)], 1)
    solution = torch.linalg.lstsq(design, points).solution
    residual = points - design @ solution
    centred = points - points.mean(0)
    return float(residual.pow(2).sum() / centred.pow(2).sum())


def manifold_experiment(activations: Iterable[str] = MANIFOLD_ACTIVATIONS, dims: Iterable[int] = MANIFOLD_DIMS,
                        draws: int = 20, seed: int = 0, points: int = 600, radius: float = 8.0,
                        tolerance: float = 0.01) -> dict:
    """The spiral experiment for every activation and dimension n.

    For each n, ``draws`` random matrices T (seeds ``seed``, ``seed + 1``, ...) give the two numbers
    per (activation, n): the share of spiral points where f(T x) is locally invertible ("kept") and the
    read-out error of T^+ f(T x). The first draw's outputs are kept for plotting. Returns
    {"points", "position", "outputs": {(activation, n): (points, 2)}, "metrics": DataFrame}.
    """
    activations, dims = _check_names(activations), [int(n) for n in dims]
    if any(n < 2 for n in dims):
        raise ValueError(f"dims: got {dims}; allowed values are integers >= 2 (the spiral is 2-D)")
    x, position = spiral(points, radius=radius)
    outputs, rows = {}, []
    for n in dims:
        for draw in range(draws):
            t = random_embedding(n, seed + 1000 * n + draw)
            for act in activations:
                y = manifold_transform(x, act, t)
                if draw == 0:
                    outputs[(act, n)] = y
                rows.append({"activation": act, "n": n, "draw": draw,
                             "kept": float(locally_invertible(x, act, t, tolerance).double().mean()),
                             "readout_error": readout_error(x, y)})
    raw = pd.DataFrame(rows)
    metrics = raw.groupby(["activation", "n"], sort=False).agg(
        kept=("kept", "mean"), kept_std=("kept", "std"), readout_error=("readout_error", "mean"),
        readout_error_std=("readout_error", "std"), draws=("draw", "count")).reset_index()
    first = raw[raw["draw"] == 0].set_index(["activation", "n"])
    metrics["kept_shown"] = [first.loc[(a, n), "kept"] for a, n in zip(metrics["activation"], metrics["n"])]
    metrics["readout_error_shown"] = [first.loc[(a, n), "readout_error"]
                                      for a, n in zip(metrics["activation"], metrics["n"])]
    return {"points": x, "position": position, "outputs": outputs, "metrics": metrics,
            "radius": radius, "tolerance": tolerance, "draws": draws}


# ---------------------------------------------------------------------------------------------
# Shared: batches of the session's dataset, names of layers
# ---------------------------------------------------------------------------------------------

def work_sizes(profile) -> dict:
    """This notebook's work sizes under ``profile`` (``mnv2lib.analysis.work_sizes``)."""
    return _work_sizes(profile, "activations")


def image_batch(dataset, split: str = "train", size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of a split, drawn reproducibly by ``seed``: (normalized float batch, labels)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: got {split!r}; allowed values are ('train', 'test')")
    images = getattr(dataset, f"{split}_images")
    labels = torch.as_tensor(getattr(dataset, f"{split}_labels"))
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=g)[:size]
    mean = torch.as_tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (torch.as_tensor(images[index]).float() / 255 - mean) / std
    return x, labels[index].long()


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "features" and parts[1].isdigit() else None


def layer_labels(model: nn.Module, names: list[str], kinds: list[str]) -> list[str]:
    """Readable labels: "stem", "b3 expand", "b3 depthwise", "b3 project", "head"."""
    last = len(model.features) - 1 if hasattr(model, "features") else None
    labels = []
    for name, kind in zip(names, kinds):
        i = _block_index(name)
        if i == 0:
            labels.append("stem")
        elif i is not None and i == last:
            labels.append("head")
        elif i is not None:
            labels.append(f"b{i} {kind}")
        else:
            labels.append(name)
    return labels


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d, str]]:
    """Every convolution in depth (forward) order: (name, module, kind)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out = []
    for name, conv in convs:
        if conv.groups > 1 and conv.groups == conv.in_channels:
            kind = "depthwise"
        elif ".conv." in name:
            block = model.get_submodule(name.split(".conv.")[0] + ".conv")
            first = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
            kind = "expand" if conv is first else "project"
        else:
            kind = "conv"
        out.append((name, conv, kind))
    return out


# ---------------------------------------------------------------------------------------------
# 3. Gradient norms at initialization
# ---------------------------------------------------------------------------------------------

def layer_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """One training-mode forward/backward of the cross-entropy loss: per conv layer (depth order)
    the Frobenius norm of dL/dW and of W."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    layers = conv_layers(model)
    names = [n for n, _, _ in layers]
    kinds = [k for _, _, k in layers]
    labels = layer_labels(model, names, kinds)
    rows = [{"depth": i, "layer": name, "label": label, "kind": kind,
             "grad_norm": float(conv.weight.grad.norm()), "weight_norm": float(conv.weight.detach().norm()),
             "loss": float(loss.detach())}
            for i, ((name, conv, kind), label) in enumerate(zip(layers, labels))]
    model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows)


def init_gradient_norms(model_configs: dict, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        seeds: Iterable[int], show_progress: bool = True) -> pd.DataFrame:
    """Per-layer gradient norms of freshly initialized models: for each named ``ModelConfig`` and each
    seed (model initialization ``torch.manual_seed(seed)``, batch ``batches[i]`` for the i-th seed).
    Returns one row per (model, seed, conv layer)."""
    from ..models import build_model

    seeds = list(seeds)
    if len(batches) < len(seeds):
        raise ValueError(f"batches: got {len(batches)} for {len(seeds)} seeds; allowed: one batch per seed")
    jobs = [(name, config, i, seed) for name, config in model_configs.items() for i, seed in enumerate(seeds)]
    frames = []
    for name, config, i, seed in progress(jobs, enabled=show_progress, desc="gradient norms", unit="model"):
        torch.manual_seed(seed)
        model = build_model(config)
        frame = layer_gradient_norms(model, *batches[i])
        frame.insert(0, "seed", seed)
        frame.insert(0, "model", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def gradient_study(dataset, profile, activations: Iterable[str] = ("relu6", "mish"), seed: int = 0,
                   show_progress: bool = True) -> pd.DataFrame:
    """The notebook's gradient experiment: the profile's MobileNetV2 (17 blocks; the profile's width
    and stem, as trained in the ablation) with each activation, several seeds, each seed its own real
    batch of training images."""
    from ..runs.profiles import get_profile
    from ..runs.spec import model_config_for

    profile = get_profile(profile)
    sizes = work_sizes(profile)
    seeds = list(range(seed, seed + sizes["gradient_seeds"]))
    batches = [image_batch(dataset, "train", sizes["gradient_batch"], s) for s in seeds]
    configs = {a: model_config_for({"activation": a}, profile, len(dataset.classes)) for a in activations}
    return init_gradient_norms(configs, batches, seeds, show_progress)


def seeds_of(table: pd.DataFrame) -> tuple[int, ...]:
    """The seeds in a result table, as plain ints (for a figure's provenance)."""
    return tuple(int(s) for s in sorted(table["seed"].unique()))


def gradient_summary(norms: pd.DataFrame) -> pd.DataFrame:
    """Per model and layer: median, min and max gradient norm over seeds."""
    return (norms.groupby(["model", "depth", "label", "kind"], sort=False)["grad_norm"]
            .agg(median="median", low="min", high="max").reset_index())


def first_last_ratios(norms: pd.DataFrame) -> pd.DataFrame:
    """Per model and seed: gradient norm of the first conv layer / that of the last."""
    def ratio(group):
        g = group.sort_values("depth")
        return g["grad_norm"].iloc[0] / g["grad_norm"].iloc[-1]

    rows = [{"model": m, "seed": s, "ratio": ratio(g)} for (m, s), g in norms.groupby(["model", "seed"], sort=False)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 4. Distributions of a trained model's activation outputs
# ---------------------------------------------------------------------------------------------

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules (any registered activation class) in forward order."""
    classes = tuple({get_activation_class(n) for n in activation_names()})
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def _activation_kind(model: nn.Module, name: str) -> str:
    if name.endswith("bottleneck_activation"):
        return "project"
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    conv = next((m for m in parent.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "expand" if ".conv." in name else "conv"


@torch.no_grad()
def record_activations(model: nn.Module, x: torch.Tensor, samples: int = 20000, seed: int = 0,
                       batch_size: int = 128) -> dict[str, dict]:
    """Run ``x`` through the model (eval mode) and record every activation module's output with a
    forward hook: exact fractions of negative, zero and six-valued outputs, mean and std over all
    values, and a reproducible random sample of ``samples`` values for quantiles and histograms.

    Returns {module name: {"label", "kind", "count", "fraction_negative", "fraction_zero",
    "fraction_six", "mean", "std", "min", "max", "sample"}} in depth order."""
    model.eval()
    modules = activation_modules(model)
    if not modules:
        raise ValueError("model: has no activation module; allowed: a model with registered activations")
    names = [n for n, _ in modules]
    labels = layer_labels(model, names, [_activation_kind(model, n) for n in names])
    stats = {n: {"label": lab, "kind": _activation_kind(model, n), "count": 0, "negative": 0, "zero": 0, "six": 0,
                 "sum": 0.0, "sum_sq": 0.0, "min": math.inf, "max": -math.inf, "chunks": []}
             for n, lab in zip(names, labels)}
    chunks = list(torch.split(x, batch_size))
    per_chunk = [math.ceil(samples * len(c) / len(x)) for c in chunks]
    state = {"chunk": 0}

    def hook_for(name, layer_index):
        def hook(module, args, output):
            y = output.detach().double().flatten()
            s = stats[name]
            s["count"] += y.numel()
            s["negative"] += int((y < 0).sum())
            s["zero"] += int((y == 0).sum())
            s["six"] += int((y == 6).sum())
            s["sum"] += float(y.sum())
            s["sum_sq"] += float((y * y).sum())
            s["min"] = min(s["min"], float(y.min()))
            s["max"] = max(s["max"], float(y.max()))
            g = torch.Generator().manual_seed(seed * 100_003 + layer_index * 1009 + state["chunk"])
            k = per_chunk[state["chunk"]]
            s["chunks"].append(y[torch.randint(len(y), (k,), generator=g)].float())
        return hook

    handles = [m.register_forward_hook(hook_for(n, i)) for i, (n, m) in enumerate(modules)]
    try:
        for i, chunk in enumerate(chunks):
            state["chunk"] = i
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, s in stats.items():
        count = s["count"]
        mean = s["sum"] / count
        out[n] = {"label": s["label"], "kind": s["kind"], "count": count,
                  "fraction_negative": s["negative"] / count, "fraction_zero": s["zero"] / count,
                  "fraction_six": s["six"] / count, "mean": mean,
                  "std": math.sqrt(max(s["sum_sq"] / count - mean * mean, 0.0)), "min": s["min"], "max": s["max"],
                  "sample": torch.cat(s["chunks"])[:samples]}
    return out


def distribution_summary(records: dict[str, dict[str, dict]], quantiles=QUANTILES) -> pd.DataFrame:
    """One row per (model, activation layer): depth, label, the quantiles of the sampled outputs
    (columns q01, q05, ...), and the exact fractions, mean, std, min, max."""
    rows = []
    for model, layers in records.items():
        for depth, (name, r) in enumerate(layers.items()):
            q = torch.quantile(r["sample"].double(), torch.tensor(quantiles, dtype=torch.float64))
            row = {"model": model, "depth": depth, "layer": name, "label": r["label"], "kind": r["kind"]}
            row.update({f"q{round(100 * p):02d}": float(v) for p, v in zip(quantiles, q)})
            row.update({k: r[k] for k in ("fraction_negative", "fraction_zero", "fraction_six", "mean", "std",
                                          "min", "max", "count")})
            rows.append(row)
    return pd.DataFrame(rows)


def distribution_study(models: dict[str, nn.Module], dataset, profile, seed: int = 0,
                       show_progress: bool = True) -> dict[str, dict[str, dict]]:
    """The notebook's distribution experiment: each trained model's activation outputs on the same
    reproducible batch of test images (size by profile)."""
    sizes = work_sizes(profile)
    x, _ = image_batch(dataset, "test", sizes["distribution_images"], seed)
    return {name: record_activations(model, x, samples=sizes["samples_per_layer"], seed=seed)
            for name, model in progress(list(models.items()), enabled=show_progress, desc="activations",
                                        unit="model")}


# ---------------------------------------------------------------------------------------------
# The notebook's conclusions, from its numbers
# ---------------------------------------------------------------------------------------------

