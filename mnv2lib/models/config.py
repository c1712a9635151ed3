"""``ModelConfig``: every choice that defines a model, validated, round-tripping through JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..layers.activations import activation_names
from ..layers.attention import MAX_ATTENTION_KERNEL, attention_names, check_kernel_size
from ..utils.checks import check_bool, check_int, check_number, plain_number, plain_numbers
from .mobilenetv2 import SHORTCUTS
from .registry import arch_names, default_activation

STEMS = ("imagenet", "cifar", "cifar_lite")
ATTENTION_POSITIONS = ("residual", "block_output", "after_depthwise")
CNSN_KINDS = (None, "cn", "sn", "cnsn")
CNSN_POSITIONS = ("post", "pre", "residual", "identity")
CROSSNORM_MODES = ("2-instance", "1-instance")
CROSSNORM_CROPS = ("neither", "style", "content", "both")
PRETRAINED = (None, "imagenet", "imagenet1k_v1", "imagenet1k_v2")
# Upper bounds that keep a typo from allocating terabytes (width 1e6 did); the studies use <= 1.4 and t <= 10.
MAX_WIDTH_MULT = 4.0
MAX_EXPAND_RATIO = 16.0
# Fields added after run records were first stored: ``to_dict`` leaves them out while they
# hold their defaults, so the run keys (hashes of that dict) of earlier configs do not change.
_OMITTED_AT_DEFAULT = ("bottleneck_activation", "shortcut", "expand_ratio", "pretrained", "selfnorm_gate_bias",
                       "cnsn_max_reduction")
# Architectures whose builders read no ``extra`` option (MobileNetV4's builders check their own).
_NO_EXTRA_ARCHS = ("mobilenet_v2", "mobilenet_v1")


def _allowed(field_name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name}: got {value!r}; allowed values are {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenet_v2"
    num_classes: int = 1000
    width_mult: float = 1.0
    activation: str | None = None           # None: the family's (its paper's): ReLU6 for V2, ReLU for V1 and V4
    attention: str | None = None
    attention_kernel: int = 7
    attention_position: str = "residual"
    stem: str = "imagenet"
    in_channels: int = 3
    dropout: float = 0.2
    # CNSN (Tang et al., ICCV 2021); defaults follow the official CIFAR setting.
    cnsn: str | None = None
    cnsn_position: str = "post"
    crossnorm_mode: str = "2-instance"
    crossnorm_crop: str = "both"
    cn_prob: float = 0.25
    active_num: int = 2
    selfnorm_two_gates: bool = False
    # Deviations from the official CNSN, for the decomposition of its effect (notebook 04): the initial bias
    # of SelfNorm's gate BatchNorms (0: the official; 4: gates start at sigmoid(4) = 0.98, near the
    # identity), and CNSN only in blocks whose output is at most this many times smaller than the input
    # (4 at 32x32: maps of 8x8 and larger, where the official CIFAR models place it; None: every block).
    selfnorm_gate_bias: float = 0.0
    cnsn_max_reduction: int | None = None
    # MobileNetV2's own design choices (the paper's Figure 6 ablations) and initialization.
    bottleneck_activation: str | None = None  # None: linear projection (the paper's)
    shortcut: str = "bottleneck"              # "bottleneck" (the paper's), "expansion", "none"
    expand_ratio: float | None = None         # t of every block; None: the table's values
    pretrained: str | None = None             # None, "imagenet" (torchvision's DEFAULT weights), ...
    # Free-form options an architecture may read (MobileNetV4's custom builder, say).
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # numpy numbers become Python ones here, once: the run key hashes to_dict() and json cannot write them
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain = plain_numbers(value) if f.name == "extra" else plain_number(value)
            if plain is not value:
                object.__setattr__(self, f.name, plain)
        _allowed("arch", self.arch, arch_names())
        if self.activation is None:
            object.__setattr__(self, "activation", default_activation(self.arch))
        check_int("num_classes", self.num_classes, 1)
        check_number("width_mult", self.width_mult, 0, MAX_WIDTH_MULT, low_open=True)
        _allowed("activation", self.activation, activation_names())
        _allowed("attention", self.attention, (None,) + attention_names())
        # (bool refused there) bounded as width_mult is: a typo such as 77 makes attention some 100x slower
        check_kernel_size(self.attention_kernel, "attention_kernel", maximum=MAX_ATTENTION_KERNEL)
        _allowed("attention_position", self.attention_position, ATTENTION_POSITIONS)
        _allowed("stem", self.stem, STEMS)
        check_int("in_channels", self.in_channels, 1)
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _allowed("cnsn", self.cnsn, CNSN_KINDS)
        _allowed("cnsn_position", self.cnsn_position, CNSN_POSITIONS)
        _allowed("crossnorm_mode", self.crossnorm_mode, CROSSNORM_MODES)
        _allowed("crossnorm_crop", self.crossnorm_crop, CROSSNORM_CROPS)
        check_number("cn_prob", self.cn_prob, 0.0, 1.0)
        check_int("active_num", self.active_num, 1)
        check_bool("selfnorm_two_gates", self.selfnorm_two_gates)
        check_number("selfnorm_gate_bias", self.selfnorm_gate_bias, -20.0, 20.0)
        if self.cnsn_max_reduction is not None:
            check_int("cnsn_max_reduction", self.cnsn_max_reduction, 1)
        _allowed("bottleneck_activation", self.bottleneck_activation, (None,) + activation_names())
        _allowed("shortcut", self.shortcut, SHORTCUTS)
        if self.expand_ratio is not None:
            try:
                check_number("expand_ratio", self.expand_ratio, 0, MAX_EXPAND_RATIO, low_open=True)
            except ValueError as error:
                raise ValueError(f"{error} (or None: the table's values)") from None
            object.__setattr__(self, "expand_ratio", float(self.expand_ratio))  # 4 and 4.0: one config
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ValueError(f"extra: got {self.extra!r}; allowed: a dict of option name -> value")
        if self.extra and self.arch in _NO_EXTRA_ARCHS:  # it would change the run key, not the network
            raise ValueError(f"extra: got unknown option(s) {sorted(self.extra)}; {self.arch} takes no extra options "
                             "(allowed: {}; extra options are for mobilenet_v4_custom)")
        _allowed("pretrained", self.pretrained, PRETRAINED)
        if self.cnsn is not None and self.cnsn_position == "identity" and self.shortcut == "none":
            raise ValueError(f"cnsn_position: got 'identity' with shortcut='none' (no shortcut to put CNSN "
                             f"on); allowed values are {tuple(p for p in CNSN_POSITIONS if p != 'identity')}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _OMITTED_AT_DEFAULT:
            if data[name] == defaults[name]:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; allowed fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @property
    def label(self) -> str:
        """A short human-readable name: 'baseline', 'mish+triplet', 'bottleneck=relu6', 'shortcut=none',
        't=4', ... (the width is left out: it is the training profile's choice)."""
        parts = []
        if self.activation != default_activation(self.arch):
            parts.append(self.activation)
        if self.attention:
            parts.append(self.attention)
        if self.cnsn:
            parts.append(self.cnsn + (f"(gate bias {self.selfnorm_gate_bias:g})" if self.selfnorm_gate_bias else "")
                         + (f"(<={self.cnsn_max_reduction}x)" if self.cnsn_max_reduction else ""))
        if self.bottleneck_activation:
            parts.append(f"bottleneck={self.bottleneck_activation}")
        if self.shortcut != "bottleneck":
            parts.append(f"shortcut={self.shortcut}")
        if self.expand_ratio is not None:
            parts.append(f"t={self.expand_ratio:g}")
        if self.pretrained:
            parts.append(f"pretrained={self.pretrained}")
        name = "+".join(parts) or "baseline"
        return name if self.arch == "mobilenet_v2" else f"{self.arch}:{name}"
