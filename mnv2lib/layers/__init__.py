"""Building blocks, one module per concept: activations, attention, normalization (CNSN)."""
from .activations import Mish, activation_names, create_activation, get_activation_class, mish
from .attention import TripletAttention, TripletAttentionReference, create_attention, record_attention
from .cnsn import CNSN, CrossNorm, CrossNormSchedule, SelfNorm, record_cnsn

__all__ = ["Mish", "mish", "create_activation", "get_activation_class", "activation_names",
           "TripletAttention", "TripletAttentionReference", "create_attention", "record_attention",
           "CrossNorm", "SelfNorm", "CNSN", "CrossNormSchedule", "record_cnsn"]

from ..utils.plugins import load_plugins  # noqa: E402 - after the registries exist

load_plugins()  # MNV2_PLUGINS: your own activations and attention modules, registered in every process
