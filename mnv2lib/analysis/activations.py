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

from ..experiments import base_profile_name
from ..layers.activations import activation_names, get_activation_class, mish_reference
from ..progress import progress

# The trained models notebook 01 compares (build_model overrides); the run plan
# (mnv2lib.notebook_plan) trains the same ones before the notebook runs.
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


def describe_activations(curves: dict[str, dict[str, np.ndarray]]) -> str:
    """Sentences from the curves: dead-gradient regions, non-monotone dips, smoothness."""
    props = curve_properties(curves)
    low, high = props["low"].iloc[0], props["high"].iloc[0]
    lines = []
    for name, p in props.iterrows():
        parts = [f"zero gradient on {100 * p.zero_gradient_fraction:.0f}% of [{low:g}, {high:g}]"]
        if p.monotone:
            parts.append("monotone")
        else:
            parts.append(f"not monotone: minimum {p.minimum:.3f} at x = {p['x_of_minimum']:.2f}, "
                         f"slope down to {p.min_gradient:.3f}")
        if p.max_abs_second > 0:
            parts.append(f"curvature |f''| up to {p.max_abs_second:.2f}")
        else:
            parts.append("piecewise linear (f'' = 0 except at the kinks)")
        lines.append(f"- **{display_name(name)}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


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


def describe_manifold(experiment: dict) -> str:
    """The spiral experiment in sentences, conclusions chosen by the numbers."""
    m = experiment["metrics"].set_index(["activation", "n"])
    dims = sorted(experiment["metrics"]["n"].unique())
    acts = list(dict.fromkeys(experiment["metrics"]["activation"]))
    low, high = dims[0], dims[-1]

    def pct(v):
        return f"{100 * v:.0f}%"

    lines = []
    for n in (low, high):
        parts = [f"{display_name(a)} keeps {pct(m.loc[(a, n), 'kept'])} (read-out error "
                 f"{pct(m.loc[(a, n), 'readout_error'])})" for a in acts]
        lines.append(f"- At **n = {n}**: " + "; ".join(parts) + ".")
    lines.append(f"- *Kept*: share of spiral points where x -> f(Tx) is locally invertible (no direction "
                 f"shrunk more than {1 / experiment['tolerance']:.0f}-fold beyond T); *read-out error*: share of "
                 f"the spiral's variance that no linear map of T^+ f(Tx) recovers. Means over "
                 f"{experiment['draws']} random matrices T.")
    for a in [a for a in acts if a != "identity"]:
        k_low, k_high = m.loc[(a, low), "kept"], m.loc[(a, high), "kept"]
        e_low, e_high = m.loc[(a, low), "readout_error"], m.loc[(a, high), "readout_error"]
        if k_low < 0.95 and k_high > k_low:
            amount = "most of the spiral" if k_low < 0.5 else "part of the spiral"
            verdict = (f"{display_name(a)} flattens {amount} in the thin space (n = {low}: {pct(k_low)} kept) "
                       f"and {'none' if k_high >= 0.995 else 'less'} of it in the wide one "
                       f"(n = {high}: {pct(k_high)} kept)")
        elif k_low < 0.95:
            verdict = f"{display_name(a)} loses information at every n ({pct(k_low)} to {pct(k_high)} kept)"
        else:
            verdict = (f"{display_name(a)} stays locally invertible even at n = {low} ({pct(k_low)} kept), "
                       f"but bends the spiral")
        trend = "falls" if e_high < e_low else "does not fall"
        lines.append(f"- {verdict}; its read-out error {trend} from {pct(e_low)} to {pct(e_high)}.")
    relu_like = [a for a in acts if a in ("relu", "relu6")]
    if relu_like and "identity" in acts:
        worst = max(m.loc[(a, low), "readout_error"] for a in relu_like)
        best = m.loc[("identity", low), "readout_error"]
        if worst > best + 0.05:
            lines.append(f"- So a ReLU-type non-linearity on a **{low}-channel** tensor leaves up to {pct(worst)} "
                         f"of the spiral's variance out of reach of any linear read-out, where a linear layer "
                         f"leaves {pct(best)}: MobileNetV2 keeps its "
                         "thin bottleneck projections **linear** and applies the non-linearity only in the "
                         "expanded (wide) layers.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Shared: batches of the session's dataset, names of layers
# ---------------------------------------------------------------------------------------------

# Work sizes per profile: images per gradient batch, seeds, test images for distributions.
WORK_SIZES = {
    "smoke": {"gradient_batch": 16, "gradient_seeds": 2, "distribution_images": 32, "samples_per_layer": 4000,
              "manifold_draws": 4},
    "quick": {"gradient_batch": 64, "gradient_seeds": 4, "distribution_images": 256,
              "samples_per_layer": 20000, "manifold_draws": 20},
    "full": {"gradient_batch": 128, "gradient_seeds": 8, "distribution_images": 1000,
             "samples_per_layer": 50000, "manifold_draws": 50},
}
WORK_SIZES["gpu"] = WORK_SIZES["full"]  # a GPU does the full sizes in seconds


def work_sizes(profile) -> dict:
    name = base_profile_name(profile)  # a budget-ladder rung gets its base profile's sizes
    if name not in WORK_SIZES:
        raise ValueError(f"profile: got {name!r}; allowed values are {tuple(WORK_SIZES)}")
    return dict(WORK_SIZES[name])


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
    from ..experiments import get_profile, model_config_for

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


def describe_gradient_norms(norms: pd.DataFrame) -> str:
    summary = gradient_summary(norms)
    ratios = first_last_ratios(norms)
    models = list(dict.fromkeys(norms["model"]))
    seeds = norms["seed"].nunique()
    layers = norms["depth"].nunique()
    lines = []
    for m in models:
        r = ratios[ratios["model"] == m]["ratio"]
        s = summary[summary["model"] == m]
        span = math.log10(s["median"].max() / s["median"].min())
        lines.append(f"- **{display_name(m)}**: the gradient norm ratio first/last conv layer is {r.median():.3g} "
                     f"(median over {seeds} seeds, range {r.min():.3g}–{r.max():.3g}); across the {layers} conv "
                     f"layers the median norms span {span:.1f} orders of magnitude, the largest at "
                     f"`{s.loc[s['median'].idxmax(), 'label']}`, the smallest at "
                     f"`{s.loc[s['median'].idxmin(), 'label']}`.")
    if len(models) == 2:
        a, b = models
        wide = summary.pivot_table(index="depth", columns="model", values="median")
        larger = int((wide[b] > wide[a]).sum())
        geo = float(np.exp(np.mean(np.log(wide[b] / wide[a]))))
        lines.append(f"- {display_name(b)}'s gradient is larger than {display_name(a)}'s in {larger} of {layers} "
                     f"layers; on average (geometric mean over layers) it is {geo:.2f} times {display_name(a)}'s.")
    return "\n".join(lines)


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


def describe_distributions(summary: pd.DataFrame) -> str:
    models = list(dict.fromkeys(summary["model"]))
    lines = []
    for m in models:
        s = summary[summary["model"] == m]
        layers = len(s)
        zero, neg, six = s["fraction_zero"], s["fraction_negative"], s["fraction_six"]
        parts = []
        if zero.max() > 0.001:
            parts.append(f"exactly zero for a median {100 * zero.median():.0f}% of outputs per layer "
                         f"(from {100 * zero.min():.0f}% at `{s.loc[zero.idxmin(), 'label']}` to "
                         f"{100 * zero.max():.0f}% at `{s.loc[zero.idxmax(), 'label']}`)")
        if neg.max() > 0.001:
            parts.append(f"negative for a median {100 * neg.median():.0f}% of outputs per layer (from "
                         f"{100 * neg.min():.0f}% to {100 * neg.max():.0f}%), never below {s['min'].min():.3f}")
        if six.max() > 0.001:
            parts.append(f"saturated at 6 for up to {100 * six.max():.1f}% (`{s.loc[six.idxmax(), 'label']}`)")
        parts.append(f"median output {s['q50'].median():.3g} and 99th percentile up to {s['q99'].max():.3g}")
        lines.append(f"- **{display_name(m)}** ({layers} activation layers): " + "; ".join(parts) + ".")
    if len(models) == 2:
        a, b = models
        sa, sb = summary[summary["model"] == a], summary[summary["model"] == b]
        silent_a = (sa["fraction_zero"] + sa["fraction_negative"]).mean()
        silent_b = (sb["fraction_zero"] + sb["fraction_negative"]).mean()
        sentence = (f"- Averaged over layers, {100 * silent_a:.0f}% of {display_name(a)}'s outputs are ≤ 0 "
                    f"against {100 * silent_b:.0f}% of {display_name(b)}'s")
        zero_a, negative_b = sa["fraction_zero"].mean(), sb["fraction_negative"].mean()
        if zero_a > 0.01 and negative_b > 0.01:
            sentence += (f"; {display_name(a)}'s are exact zeros ({100 * zero_a:.0f}%: its gradient is zero there), "
                         f"{display_name(b)}'s are small negative values ({100 * negative_b:.0f}%) that still pass "
                         "a gradient back")
        lines.append(sentence + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The notebook's conclusions, from its numbers
# ---------------------------------------------------------------------------------------------

def summarize_study(manifold: dict, norms: pd.DataFrame | None = None, distributions: pd.DataFrame | None = None,
                    accuracies: dict[str, float] | None = None) -> str:
    """Three to four bullet points that close the notebook: the spiral at the smallest n, the first/last
    gradient ratio per activation, the share of silent (zero) outputs, and the trained accuracies."""
    m = manifold["metrics"].set_index(["activation", "n"])
    acts = [a for a in dict.fromkeys(manifold["metrics"]["activation"]) if a != "identity"]
    low = int(manifold["metrics"]["n"].min())
    kept = ", ".join(f"{display_name(a)} keeps {100 * m.loc[(a, low), 'kept']:.0f}%" for a in acts)
    line = f"- **Linear bottleneck.** At n = {low}, {kept} of the spiral locally invertible"
    if "identity" in set(manifold["metrics"]["activation"]):
        linear = m.loc[("identity", low), "kept"]
        line += f", the identity {100 * linear:.0f}%"
        losers = [display_name(a) for a in acts if m.loc[(a, low), "kept"] < linear - 0.05]
        if losers:
            line += (f"; in a {low}-channel bottleneck {', '.join(losers)} lose information that a linear "
                     "projection keeps")
    lines = [line + "."]
    if norms is not None:
        ratios = first_last_ratios(norms).groupby("model", sort=False)["ratio"].median()
        text = "; ".join(f"{display_name(k)} {v:.3g}" for k, v in ratios.items())
        closer = min(ratios.items(), key=lambda kv: abs(math.log(kv[1])))[0]
        lines.append(f"- **Gradients at initialization.** The gradient norm ratio first/last conv layer is {text} "
                     f"(median over seeds); {display_name(closer)} spreads the gradient most evenly over depth.")
    if distributions is not None:
        shares = distributions.groupby("model", sort=False).agg(zero=("fraction_zero", "mean"),
                                                                negative=("fraction_negative", "mean"))
        text = "; ".join(f"{display_name(k)}: {100 * r.zero:.0f}% exactly zero, {100 * r.negative:.0f}% negative"
                         for k, r in shares.iterrows())
        lines.append(f"- **Trained activations** (mean over layers): {text}.")
    if accuracies:
        text = ", ".join(f"{display_name(k)} {100 * v:.1f}%" for k, v in accuracies.items())
        lines.append(f"- **Clean test accuracy** of the two trained models: {text}.")
    return "\n".join(lines)
