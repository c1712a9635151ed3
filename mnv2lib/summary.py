"""Model summaries, built on torchinfo."""
from __future__ import annotations

from torch import nn


def summary(model: nn.Module, input_size=(1, 3, 224, 224), depth: int = 3, verbose: int = 0, **kwargs):
    """torchinfo's summary (layers, output shapes, parameters, multiply-adds) in eval mode."""
    import torchinfo

    was_training = model.training
    model.eval()
    try:
        return torchinfo.summary(model, input_size=input_size, depth=depth, verbose=verbose,
                                 col_names=("output_size", "num_params", "mult_adds"), **kwargs)
    finally:
        model.train(was_training)
