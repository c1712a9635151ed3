"""The sentences of notebook prose about activations, generated from the numbers (computation: ``mnv2lib.analysis.activations``)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..activations import curve_properties, display_name, first_last_ratios, gradient_summary


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
