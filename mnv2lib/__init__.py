"""mnv2lib: the library behind the MobileNetV2 research workbook.

Layers, each a folder, imports only pointing down (tests/test_architecture.py checks it):
utils <- ops <- layers <- models <- engine <- runs <- analysis, benchmarks <- figures <- workbook.
"""
from .engine.summary import summary
from .models import ModelConfig, build_model
from .utils import paths

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "summary", "paths", "__version__"]
