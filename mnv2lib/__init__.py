"""mnv2lib: the library behind the MobileNetV2 research workbook.

Layers (activations, attention, CNSN) <- models <- engine <- analysis and figures.
"""
from . import paths
from .models import ModelConfig, build_model
from .summary import summary

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "summary", "paths", "__version__"]
