"""What CNSN sees under distribution shift (notebook 03).

Every CNSN module of a model sees a feature map and summarizes each channel of each image
by two numbers, its spatial mean and std: the "style" that CrossNorm exchanges and from
which SelfNorm computes its gates. This module records those statistics for batches of
training, clean test and corrupted test images, applies CrossNorm in each of its modes to
the recorded training feature maps, and measures

- how far corrupted-test statistics move from clean ones (a standardized Wasserstein-1
  distance per channel, averaged over channels),
- whether the range of statistics seen in training, with and without CrossNorm, covers
  the corrupted-test statistics,
- how much the SelfNorm gates change with corruption type and severity.

Every table is a tidy ``pandas.DataFrame``: one row per (layer, source, severity,
CrossNorm variant, image, channel), see :func:`feature_statistics`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..engine.summary import training_mode
from ..layers.cnsn import CNSN, CrossNorm, record_cnsn
from ..utils.progress import progress
from .work_sizes import work_sizes

# CrossNorm variants applied to training feature maps: label -> (mode, crop); "off" = no exchange.
CROSSNORM_VARIANTS: dict[str, tuple[str, str] | None] = {
    "off": None,
    "2-instance": ("2-instance", "neither"),
    "1-instance": ("1-instance", "neither"),
    "2-instance, style crop": ("2-instance", "style"),
    "2-instance, content crop": ("2-instance", "content"),
    "2-instance, both crops": ("2-instance", "both"),
}

# The trained model notebook 03 studies (build_model overrides); the run plan
# (mnv2lib.workbook.plan) trains it before the notebook runs.
TRAINED_MODEL = {"cnsn": "cnsn"}

STAT_COLUMNS = ("mean", "std", "gate", "selfnorm_mean", "selfnorm_std")
ID_COLUMNS = ("layer", "block", "source", "severity", "crossnorm", "sample", "channel")
WEAK_CORRELATION = 0.2  # |Spearman's rho| below this is reported as "hardly related"


def cnsn_modules(model: nn.Module) -> dict[str, CNSN]:
    """The model's CNSN modules in forward order, keyed by their block's name ("features.3")."""
    modules = {name.removesuffix(".cnsn"): m for name, m in model.named_modules() if isinstance(m, CNSN)}
    if not modules:
        raise ValueError("model: has no CNSN module; allowed: a model built with cnsn='cn', 'sn' or 'cnsn'")
    return modules


def layer_options(stats: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, layer) pairs in block order, for a layer dropdown."""
    pairs = stats[["block", "layer"]].drop_duplicates().sort_values("block")
    return [(f"block {b} ({l})", l) for b, l in zip(pairs["block"], pairs["layer"].astype(str))]


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the normalized float batch the models were trained on."""
    from ..engine.data import normalize

    return normalize(images, mean, std)


def _response(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One CNSN module's record (see :class:`record_cnsn`) as the table's statistic columns, each (B, C)."""
    nan = torch.full_like(r["input_mean"], float("nan"))
    return {"mean": r.get("crossnorm_mean", r["input_mean"]), "std": r.get("crossnorm_std", r["input_std"]),
            "gate": r.get("gate_g", nan), "selfnorm_mean": r.get("selfnorm_mean", r["input_mean"]),
            "selfnorm_std": r.get("selfnorm_std", r["input_std"])}


@torch.no_grad()
def _record_forward(model: nn.Module, x: torch.Tensor, capture: bool):
    """One eval-mode forward: (copies of the maps entering each CNSN module if ``capture``, else {},
    each module's statistics as :func:`_response` columns), keyed like :func:`cnsn_modules`."""
    modules = cnsn_modules(model)
    captured: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0].clone()))
               for name, m in modules.items()] if capture else []
    names = {id(m): name for name, m in modules.items()}
    try:
        with training_mode(model, False), record_cnsn(model) as recorded:
            model(x)
    finally:
        for h in handles:
            h.remove()
    by_module = dict(model.named_modules())
    return captured, {names[id(by_module[full])]: _response(r) for full, r in recorded.items()}


def capture_cnsn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature map entering each CNSN module (copies) for the batch ``x``; model in eval mode."""
    return _record_forward(model, x, capture=True)[0]


@torch.no_grad()
def cnsn_response(module: CNSN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run one CNSN module in eval mode (CrossNorm is then the identity) on ``x`` and return, each (B, C):
    ``mean``/``std`` of ``x``, the SelfNorm ``gate`` (NaN without SelfNorm) and ``selfnorm_mean``/``selfnorm_std``
    of the module's output."""
    with training_mode(module, False), record_cnsn(module) as recorded:
        module(x)
    return _response(recorded[""])


def _generator(seed: int, *keys: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _frame(chunks: list[dict[str, np.ndarray]], layers: list[str], source: str) -> pd.DataFrame:
    columns = {k: np.concatenate([c[k] for c in chunks]) for k in
               ("layer_index", "variant_index", "sample", "channel", *STAT_COLUMNS)}
    n = len(columns["sample"])
    return pd.DataFrame({
        "layer": pd.Categorical.from_codes(columns["layer_index"], categories=layers),
        "block": (columns["layer_index"] + 1).astype(np.int16),
        "source": pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[source]),
        "severity": np.zeros(n, dtype=np.int8),
        "crossnorm": pd.Categorical.from_codes(columns["variant_index"], categories=list(CROSSNORM_VARIANTS)),
        "sample": columns["sample"].astype(np.int32),
        "channel": columns["channel"].astype(np.int16),
        **{k: columns[k].astype(np.float32) for k in STAT_COLUMNS},
    })


@torch.no_grad()
def feature_statistics(model: nn.Module, images: torch.Tensor, source: str, severity: int = 0,
                       variants: tuple[str, ...] = ("off",), seed: int = 0, batch_size: int = 128) -> pd.DataFrame:
    """Per CNSN layer, image and channel: the statistics entering SelfNorm, its gate and its output statistics.

    ``images`` is a normalized float batch. The model runs in eval mode (CrossNorm off); for each
    variant other than "off" a fresh :class:`CrossNorm` of that mode and crop (seeded from ``seed``,
    the variant, the layer and the batch) exchanges the statistics of the feature map entering each
    CNSN module (2-instance: between the images of a batch of ``batch_size``), and the module's
    SelfNorm is applied to the result, as it would be in a training step with CrossNorm on at that
    layer. Downstream layers are not re-run: each layer shows its own exchange only.

    Returns a tidy DataFrame with columns layer, block (1-based position), source, severity,
    crossnorm (variant), sample (index into ``images``), channel, mean, std (entering SelfNorm,
    i.e. after CrossNorm), gate (SelfNorm's), selfnorm_mean, selfnorm_std (after SelfNorm).
    """
    unknown = [v for v in variants if v not in CROSSNORM_VARIANTS]
    if unknown:
        raise ValueError(f"variants: got {unknown!r}; allowed values are {tuple(CROSSNORM_VARIANTS)}")
    modules = cnsn_modules(model)
    layers = list(modules)
    variant_ids = {v: list(CROSSNORM_VARIANTS).index(v) for v in variants}
    exchanged = [v for v in variants if CROSSNORM_VARIANTS[v] is not None]
    chunks = []
    for b, start in enumerate(range(0, images.shape[0], batch_size)):
        inputs, plain = _record_forward(model, images[start:start + batch_size], capture=bool(exchanged))
        for li, name in enumerate(layers):
            for variant in variants:
                spec = CROSSNORM_VARIANTS[variant]
                if spec is None:
                    r = plain[name]
                else:
                    cn = CrossNorm(mode=spec[0], crop=spec[1], generator=_generator(seed, variant_ids[variant], li, b))
                    r = cnsn_response(modules[name], cn.exchange(inputs[name]))
                n, c = r["mean"].shape
                chunks.append({
                    "layer_index": np.full(n * c, li, dtype=np.int16),
                    "variant_index": np.full(n * c, variant_ids[variant], dtype=np.int8),
                    "sample": np.repeat(np.arange(start, start + n), c),
                    "channel": np.tile(np.arange(c), n),
                    **{k: r[k].float().cpu().numpy().reshape(-1) for k in STAT_COLUMNS},
                })
    frame = _frame(chunks, layers, source)
    frame["severity"] = np.int8(severity)
    return frame


def concat_statistics(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables of :func:`feature_statistics`, keeping the categorical columns."""
    frames = [f for f in frames if len(f)]
    layers = list(frames[0]["layer"].cat.categories)
    sources = list(dict.fromkeys(s for f in frames for s in f["source"].cat.categories))
    out = []
    for f in frames:
        f = f.copy()
        f["source"] = f["source"].cat.set_categories(sources)
        f["layer"] = f["layer"].cat.set_categories(layers)
        out.append(f)
    return pd.concat(out, ignore_index=True)


def study_plan(profile) -> dict:
    """What the notebook measures under a profile: images per source, corruptions, severities, set size."""
    from ..engine.corruptions import CORRUPTIONS

    return {"images": work_sizes(profile, "cnsn")["images"],
            "corruptions": tuple(profile.corruptions or CORRUPTIONS), "severities": tuple(profile.severities),
            "set_size": profile.corruption_test_size}


def collect_statistics(model: nn.Module, dataset, plan: dict, seed: int = 0, show_progress: bool = True,
                       variants: tuple[str, ...] = tuple(CROSSNORM_VARIANTS)) -> pd.DataFrame:
    """Statistics of ``plan["images"]`` training images (every CrossNorm variant), as many clean test
    images, and the corrupted versions of the test set for every corruption and severity of the plan
    (``load_corrupted_test_set(dataset, corruption, severity, size=plan["set_size"])``, its first
    ``plan["images"]`` images). Training images are a seeded random subset."""
    from ..engine.corruptions import load_corrupted_test_set
    from ..engine.data import torch_threads

    n = plan["images"]
    order = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(seed))[:n]
    jobs = [("train", 0), ("clean", 0)] + [(c, s) for c in plan["corruptions"] for s in plan["severities"]]
    frames = []
    for source, severity in progress(jobs, enabled=show_progress, desc="feature statistics", unit="set"):
        if source == "train":
            images, job_variants = dataset.train_images[order], variants
        elif source == "clean":
            images, job_variants = dataset.test_images[:n], ("off",)
        else:
            images = load_corrupted_test_set(dataset, source, severity, size=plan["set_size"])[0][:n]
            job_variants = ("off",)
        x = normalize_images(images, dataset.mean, dataset.std)
        with torch_threads(1):  # many small ops: one thread is as fast, and far faster on a busy CPU
            frames.append(feature_statistics(model, x, source, severity, job_variants, seed=seed,
                                             batch_size=max(n, 2)))
    return concat_statistics(frames)


# ---------------------------------------------------------------------------------------------
# distances


def wasserstein_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Wasserstein-1 distance between the empirical distributions of each row of ``a`` (R, n) and
    ``b`` (R, m), exactly: the integral over u in (0, 1) of |Q_a(u) - Q_b(u)|, with step quantile
    functions whose breakpoints k/n and l/m are the same for every row."""
    a, b = np.sort(np.asarray(a, float), axis=1), np.sort(np.asarray(b, float), axis=1)
    n, m = a.shape[1], b.shape[1]
    u = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid = (u[:-1] + u[1:]) / 2
    ia = np.minimum((mid * n).astype(int), n - 1)
    ib = np.minimum((mid * m).astype(int), m - 1)
    return (np.abs(a[:, ia] - b[:, ib]) * np.diff(u)).sum(1)


def _grouped_arrays(rows: pd.DataFrame, keys: list[str], columns: tuple[str, ...]) -> dict:
    """{group key: ({column: (channels, samples) array}, channels)} for complete (channel x sample) grids."""
    out = {}
    for key, group in rows.groupby(keys, observed=True, sort=False):
        channel, sample = group["channel"].to_numpy(), group["sample"].to_numpy()
        order = np.lexsort((sample, channel))
        channels = np.unique(channel)
        if len(group) % len(channels):
            raise ValueError(f"group {key}: channels have different numbers of images")
        out[key] = ({c: group[c].to_numpy(float)[order].reshape(len(channels), -1) for c in columns}, channels)
    return out


def standardized_spread(ref: np.ndarray) -> np.ndarray:
    """Per-row sample std (ddof 1), floored at 1% of the layer's median so that nearly constant
    channels do not dominate averages."""
    sd = ref.std(axis=1, ddof=1) if ref.shape[1] > 1 else np.zeros(ref.shape[0])
    floor = 0.01 * np.nanmedian(sd) if np.isfinite(np.nanmedian(sd)) and np.nanmedian(sd) > 0 else 1e-6
    return np.maximum(sd, max(floor, 1e-12))


def statistic_shift(stats: pd.DataFrame, reference: str = "clean",
                    statistics: tuple[str, ...] = ("mean", "std", "selfnorm_mean", "selfnorm_std")) -> pd.DataFrame:
    """How far each source's per-channel statistics sit from the reference's (CrossNorm "off" rows).

    Per layer, source, severity and statistic: ``distance`` = mean over channels of W1(source_c, ref_c) / sd_c,
    ``abs_shift`` = mean over channels of |mean(source_c) - mean(ref_c)| / sd_c, where source_c and ref_c are
    the channel's values over images and sd_c the reference's spread over images (see
    :func:`standardized_spread`): distances in units of the clean image-to-image spread.
    """
    off = stats[stats["crossnorm"] == "off"]
    groups = _grouped_arrays(off, ["layer", "source", "severity"], tuple(statistics) + ("block",))
    sources = sorted({k[1] for k in groups})
    if reference not in sources:
        raise ValueError(f"reference: got {reference!r}; allowed values are the sources {sources}")
    references = {k[0]: v for k, v in groups.items() if k[1] == reference}
    rows = []
    for (layer, source, severity), (arrays, channels) in groups.items():
        if source == reference:
            continue
        ref_arrays, ref_channels = references[layer]
        if not np.array_equal(channels, ref_channels):
            raise ValueError(f"layer {layer}: source {source!r} has other channels than the reference")
        for statistic in statistics:
            src, ref = arrays[statistic], ref_arrays[statistic]
            sd = standardized_spread(ref)
            rows.append({"layer": str(layer), "block": int(arrays["block"][0, 0]), "source": str(source),
                         "severity": int(severity), "statistic": statistic,
                         "distance": float(np.mean(wasserstein_rows(src, ref) / sd)),
                         "abs_shift": float(np.mean(np.abs(src.mean(1) - ref.mean(1)) / sd))})
    if not rows:
        return pd.DataFrame(columns=["layer", "block", "source", "severity", "statistic", "distance", "abs_shift"])
    return pd.DataFrame(rows).sort_values("block", kind="stable", ignore_index=True)


def _corrupted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[~frame["source"].isin(["train", "clean"])]


def corruption_order(frame: pd.DataFrame) -> list[str]:
    """The corrupted sources of a table, in the order they were measured (CIFAR-10-C order)."""
    return [str(s) for s in dict.fromkeys(frame["source"]) if s not in ("train", "clean")]


def _extremes(per: pd.Series, fmt: str) -> str:
    """"most under A (x), least under B (y)" or, with one entry, "under A"."""
    if len(per) == 1:
        return f"(one corruption measured: **{per.index[0]}**)"
    return (f"most under **{per.index[0]}** ({per.iloc[0]:{fmt}}), least under **{per.index[-1]}** "
            f"({per.iloc[-1]:{fmt}})")


# ---------------------------------------------------------------------------------------------
# coverage


def coverage(stats: pd.DataFrame, variants: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Do training statistics span the test statistics?

    For each CrossNorm variant v, the training range of a (layer, channel) is [min, max] of its mean and
    of its std over the training images without CrossNorm together with those after CrossNorm v (the
    mixture a CrossNorm-trained network sees; for "off" the plain training images alone). For every
    test source (clean and corrupted, CrossNorm off) it returns the fraction of (image, channel) pairs
    whose mean lies in the range (``covered_mean``), whose std does (``covered_std``), and both
    (``covered``), per layer, source, severity and variant.
    """
    train = stats[stats["source"] == "train"]
    available = [v for v in CROSSNORM_VARIANTS if v in set(train["crossnorm"].astype(str))]
    variants = tuple(v for v in (variants or available) if v in available)
    if "off" not in available:
        raise ValueError("stats: has no plain training rows (source 'train', crossnorm 'off')")
    test = stats[(stats["source"] != "train") & (stats["crossnorm"] == "off")]

    def keys(frame):  # one integer per (layer, channel)
        return frame["layer"].cat.codes.to_numpy().astype(np.int64) * 2**20 + frame["channel"].to_numpy()

    test_keys = keys(test)
    test_mean, test_std = test["mean"].to_numpy(), test["std"].to_numpy()
    labels = test[["layer", "block", "source", "severity"]].reset_index(drop=True)
    rows = []
    for variant in variants:
        pool = train[train["crossnorm"].isin(["off", variant])]
        ranges = pd.DataFrame({"key": keys(pool), "mean": pool["mean"].to_numpy(), "std": pool["std"].to_numpy()})
        ranges = ranges.groupby("key")[["mean", "std"]].agg(["min", "max"])
        idx = ranges.index.get_indexer(test_keys)
        if (idx < 0).any():
            raise ValueError("stats: test rows have (layer, channel) pairs absent from the training rows")
        r = {col: ranges[col].to_numpy()[idx] for col in ranges.columns}
        in_mean = (test_mean >= r[("mean", "min")]) & (test_mean <= r[("mean", "max")])
        in_std = (test_std >= r[("std", "min")]) & (test_std <= r[("std", "max")])
        flags = labels.assign(covered_mean=in_mean, covered_std=in_std, covered=in_mean & in_std)
        grouped = flags.groupby(["layer", "block", "source", "severity"], observed=True, sort=False)
        frame = grouped[["covered_mean", "covered_std", "covered"]].mean().reset_index()
        frame.insert(4, "crossnorm", variant)
        rows.append(frame)
    out = pd.concat(rows, ignore_index=True)
    out["layer"] = out["layer"].astype(str)
    out["source"] = out["source"].astype(str)
    return out


# ---------------------------------------------------------------------------------------------
# SelfNorm gates


def gate_response(stats: pd.DataFrame, reference: str = "clean") -> pd.DataFrame:
    """Per layer, source and severity (CrossNorm off): ``mean_gate`` (over images and channels),
    ``gate_change`` = mean over channels of |mean gate of the source - mean gate of the reference|
    (the average over images taken per channel), and ``gate_shift``, the same without the absolute value."""
    off = stats[(stats["crossnorm"] == "off") & stats["gate"].notna()]
    if off.empty:
        raise ValueError("stats: no SelfNorm gates recorded (a model built with cnsn='cn' has none)")
    per_channel = off.groupby(["layer", "block", "source", "severity", "channel"], observed=True)["gate"].mean()
    per_channel = per_channel.reset_index()
    ref = per_channel[per_channel["source"] == reference].set_index(["layer", "channel"])["gate"]
    if ref.empty:
        raise ValueError(f"reference: got {reference!r}; allowed values are {sorted(off['source'].unique())}")
    per_channel["delta"] = per_channel["gate"].to_numpy() - ref.reindex(
        pd.MultiIndex.from_frame(per_channel[["layer", "channel"]])).to_numpy()
    per_channel["abs_delta"] = per_channel["delta"].abs()
    out = per_channel.groupby(["layer", "block", "source", "severity"], observed=True, sort=False).agg(
        mean_gate=("gate", "mean"), gate_change=("abs_delta", "mean"), gate_shift=("delta", "mean")).reset_index()
    out["layer"] = out["layer"].astype(str)
    out["source"] = out["source"].astype(str)
    return out.sort_values("block", kind="stable", ignore_index=True)


def gate_severity_correlation(response: pd.DataFrame) -> pd.DataFrame:
    """Per corruption: Spearman's rho between severity and gate change, per layer over the severities,
    then averaged over layers (``rho``; NaN with fewer than two severities), the fraction of layers
    where it is positive, and ``rho_layer_mean``, rho of the layer-averaged gate change against severity."""
    from scipy.stats import spearmanr

    corrupted = _corrupted(response)
    rows = []
    for source, per in corrupted.groupby("source", sort=False):
        rhos = []
        for _, layer_rows in per.groupby("block"):
            if layer_rows["severity"].nunique() >= 2 and layer_rows["gate_change"].nunique() >= 2:
                rhos.append(spearmanr(layer_rows["severity"], layer_rows["gate_change"]).statistic)
        averaged = per.groupby("severity")["gate_change"].mean()
        rho_mean = (spearmanr(averaged.index, averaged.to_numpy()).statistic
                    if len(averaged) >= 2 and averaged.nunique() >= 2 else float("nan"))
        rows.append({"source": source, "rho": float(np.mean(rhos)) if rhos else float("nan"),
                     "positive_layers": float(np.mean(np.array(rhos) > 0)) if rhos else float("nan"),
                     "rho_layer_mean": float(rho_mean), "severities": int(per["severity"].nunique())})
    return pd.DataFrame(rows, columns=["source", "rho", "positive_layers", "rho_layer_mean", "severities"])


def gate_shift_correlation(response: pd.DataFrame, shift: pd.DataFrame, statistic: str = "mean") -> float:
    """Spearman's rho, over (layer, corruption, severity), between gate change and the statistic's distance."""
    from scipy.stats import spearmanr

    s = shift[shift["statistic"] == statistic][["layer", "source", "severity", "distance"]]
    merged = _corrupted(response).merge(s, on=["layer", "source", "severity"])
    if len(merged) < 3 or merged["gate_change"].nunique() < 2 or merged["distance"].nunique() < 2:
        return float("nan")
    return float(spearmanr(merged["gate_change"], merged["distance"]).statistic)


# ---------------------------------------------------------------------------------------------
# notebook helpers


def variant_label(mode: str, crop: str) -> str:
    """The CROSSNORM_VARIANTS label of a (mode, crop) pair, e.g. ("2-instance", "both") -> "2-instance, both crops"."""
    for label, spec in CROSSNORM_VARIANTS.items():
        if spec == (mode, crop):
            return label
    raise ValueError(f"(mode, crop): got {(mode, crop)!r}; allowed values are "
                     f"{[s for s in CROSSNORM_VARIANTS.values() if s is not None]}")


def pick_example(shift: pd.DataFrame, statistic: str = "mean") -> dict:
    """The corruption that moves the statistic most (averaged over layers and severities), at its highest
    severity, and the layer where that shift is largest: {"layer", "corruption", "severity"}."""
    s = _corrupted(shift[shift["statistic"] == statistic])
    if s.empty:
        raise ValueError("shift: has no corrupted source")
    corruption = s.groupby("source")["distance"].mean().idxmax()
    severity = int(s.loc[s["source"] == corruption, "severity"].max())
    at = s[(s["source"] == corruption) & (s["severity"] == severity)]
    return {"layer": str(at.loc[at["distance"].idxmax(), "layer"]), "corruption": str(corruption),
            "severity": severity}


