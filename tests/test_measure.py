import pytest
import torch
from torch import nn

from mnv2lib import build_model
from mnv2lib.engine.measure import (count_parameters, flops, measure_costs, multiply_adds, saved_activation_bytes, training_memory_bytes)


def test_multiply_adds_and_flops_at_224():
    v2 = build_model()
    madds = multiply_adds(v2, (1, 3, 224, 224))
    assert madds == pytest.approx(300.77e6, rel=0.01)
    assert multiply_adds(build_model(arch="mobilenet_v1"), (1, 3, 224, 224)) == pytest.approx(568.7e6, rel=0.002)
    # torch's FLOP counter: 2 FLOPs per multiply-add of convolutions and linear layers
    assert flops(v2, (1, 3, 224, 224)) == pytest.approx(2 * madds, rel=0.01)


def test_saved_activation_bytes_of_a_known_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())
    # conv saves its input (excluded: the input is the caller's) and weight (excluded);
    # ReLU saves its output: 2 x 4 x 8 x 8 floats
    assert saved_activation_bytes(net, (2, 3, 8, 8)) == 2 * 4 * 8 * 8 * 4


def test_mish_model_keeps_no_more_for_backward_than_torch_mish():
    ours = build_model(num_classes=10, width_mult=0.25, stem="cifar", activation="mish")
    reference = build_model(num_classes=10, width_mult=0.25, stem="cifar", activation="mish_reference")
    assert saved_activation_bytes(ours, (4, 3, 32, 32)) <= saved_activation_bytes(reference, (4, 3, 32, 32))


def test_training_memory_and_cost_report():
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
    memory = training_memory_bytes(model, (8, 3, 32, 32))
    params = count_parameters(model) * 4
    assert memory["parameters"] == memory["gradients"] == memory["optimizer_state"] == params
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    report = measure_costs(lambda: build_model(num_classes=10, width_mult=0.25, stem="cifar_lite"),
                           train_batch=8, repeats=1)
    assert report.parameters == count_parameters(model)
    assert report.train_images_per_s > 0 and 0 < report.latency_ms_batch1 < report.latency_ms_batch64 * 10
    assert report.multiply_adds * 2 == pytest.approx(report.flops, rel=0.02)


@pytest.mark.parametrize("overrides", [dict(attention="triplet"), dict(cnsn="sn"),
                                       dict(activation="mish", attention="triplet", cnsn="cnsn")])
def test_costs_count_the_modules_that_run_in_c_kernels(overrides):
    from mnv2lib.layers.activations import set_kernel_backend

    base = build_model(num_classes=10, width_mult=0.5, stem="cifar_lite").eval()
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar_lite", **overrides).eval()
    size = (1, 3, 32, 32)
    fast = (multiply_adds(model, size), flops(model, size))
    try:
        set_kernel_backend("eager")
        reference = (multiply_adds(model, size), flops(model, size))
    finally:
        set_kernel_backend("auto")
    assert fast == reference
    if "attention" in overrides:  # the attention convs are counted
        assert fast[0] > multiply_adds(base, size) and fast[1] > flops(base, size)
