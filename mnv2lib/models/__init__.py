"""Models: MobileNetV2 (torchvision-compatible) with injectable improvements, MobileNetV1, MobileNetV4 (timm-compatible)."""
from .config import ModelConfig
from .factory import arch_names, build_model, register_arch
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .mobilenetv4 import (  # importing it registers the MobileNetV4 archs
    MobileNetV4, convert_timm_state_dict, mobilenet_v4_custom, mobilenet_v4_hybrid_large, mobilenet_v4_hybrid_medium,
    mobilenet_v4_large, mobilenet_v4_medium, mobilenet_v4_nano, mobilenet_v4_small)

__all__ = ["ModelConfig", "build_model", "arch_names", "register_arch", "MobileNetV2", "MobileNetV1",
           "InvertedResidual", "MobileNetV4", "convert_timm_state_dict", "mobilenet_v4_small",
           "mobilenet_v4_medium", "mobilenet_v4_large", "mobilenet_v4_hybrid_medium", "mobilenet_v4_hybrid_large",
           "mobilenet_v4_nano", "mobilenet_v4_custom"]
