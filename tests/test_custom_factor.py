"""A module registered by the user joins the ablation as a factor (docs/extending-the-ablation.md)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from mnv2lib.analysis import ablation
from mnv2lib.layers.attention import register_attention
from mnv2lib.runs import api, runner
from mnv2lib.runs.spec import parse_factors

ROOT = Path(__file__).resolve().parent.parent


class ECA(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        k = int(abs(math.log2(channels) + 1) / 2)
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(x.mean((2, 3)).unsqueeze(1))).transpose(1, 2)
        return x * gate.unsqueeze(-1)


def test_a_registered_attention_runs_through_the_smoke_ablation(tmp_path, monkeypatch):
    register_attention("eca_test", lambda channels, **kwargs: ECA(channels))
    monkeypatch.setattr(runner, "measure_config_costs", lambda *a, **k: {})  # seconds each, not the point here
    factors = parse_factors("mish,eca_test")
    assert factors == {"mish": {"activation": "mish"}, "eca_test": {"attention": "eca_test"}}
    configs = api.ablation_configs(factors=factors)
    assert len(configs) == 4 and {"activation": "mish", "attention": "eca_test"} in configs
    store = api.ResultsStore(tmp_path / "results", tmp_path / "runs")
    records = api.finished(api.ensure_runs(configs, "smoke", "synthetic", seeds=(0, 1), store=store,
                                           show_progress=False))
    assert sorted({r["label"] for r in records}) == ["baseline", "eca_test", "mish", "mish+eca_test"]
    table = ablation.with_factors(api.records_to_frame(records), records, factors)
    effects = ablation.factorial_effects(table, factors)
    assert set(effects["term"]) == {"mish", "eca_test", "mish:eca_test"}
    assert effects["df_resid"].iloc[0] == 3  # 8 runs - 3 terms - intercept - 1 seed block


def test_factors_that_set_the_same_option_or_unknown_names_are_refused():
    with pytest.raises(ValueError, match="'triplet' and 'se' both set 'attention'"):
        parse_factors("triplet,se")
    with pytest.raises(ValueError, match="factors: got 'nonesuch'; allowed"):
        parse_factors("mish,nonesuch")
    with pytest.raises(ValueError, match="factors: got 'mish' twice"):
        parse_factors("mish,mish")


def test_plugins_register_modules_in_every_process(tmp_path):
    (tmp_path / "my_modules.py").write_text(textwrap.dedent("""
        from torch import nn
        from mnv2lib.layers.attention import register_attention
        register_attention("eca_plugin", lambda channels, **kwargs: nn.Identity())
    """))
    env = {**os.environ, "MNV2_PLUGINS": "my_modules", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    code = "from mnv2lib.runs.spec import parse_factors; print(parse_factors('eca_plugin'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "{'eca_plugin': {'attention': 'eca_plugin'}}" in out.stdout, out.stderr
    env["MNV2_PLUGINS"] = "no_such_module"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "MNV2_PLUGINS: cannot import 'no_such_module'" in out.stderr
