"""Models: MobileNetV2 (torchvision-compatible) with injectable improvements, MobileNetV1."""
from .config import ModelConfig
from .factory import arch_names, build_model, register_arch
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import InvertedResidual, MobileNetV2

__all__ = ["ModelConfig", "build_model", "arch_names", "register_arch", "MobileNetV2", "MobileNetV1",
           "InvertedResidual"]
