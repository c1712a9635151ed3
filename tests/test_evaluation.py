"""Evaluation takes a BatchNorm-folded copy of the model and, on a CPU, cache-sized chunks: the
numbers must be those of the model itself, evaluated as it is."""
import copy

import pytest
import torch
from torch import nn

from mnv2lib.engine.train import CPU_EVAL_CHUNK, evaluate, folded_for_inference
from mnv2lib.models import build_model

VARIANTS = [dict(), dict(activation="mish"), dict(attention="triplet"), dict(cnsn="cnsn"),
            dict(arch="mobilenet_v1", activation="relu"), dict(arch="mobilenet_v4_nano", activation="relu")]


def _trained_statistics(model: nn.Module) -> nn.Module:
    """BatchNorms with running statistics and affine parameters far from their initial values (a
    fresh BatchNorm folds to the identity and would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=generator))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "baseline")
def test_folded_copy_computes_the_same_function(overrides):
    model = _trained_statistics(build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", **overrides))
    before = copy.deepcopy(model.state_dict())
    folded = folded_for_inference(model)
    assert folded is not model
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert left < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert folded_for_inference(folded) is folded  # nothing left to fold: no second copy


def test_hooks_still_see_the_evaluation():
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
    on_block = []
    model.features[1].register_forward_hook(lambda m, i, o: on_block.append(o.shape))
    assert folded_for_inference(model) is not model  # the block stays: folded, its hook comes along
    evaluate(model, images, labels, (0.5,) * 3, (0.25,) * 3, device="cpu")
    assert on_block
    on_norm = []
    model.features[0][1].register_forward_hook(lambda m, i, o: on_norm.append(o.shape))
    assert folded_for_inference(model) is model  # folding would remove the hooked BatchNorm
    evaluate(model, images, labels, (0.5,) * 3, (0.25,) * 3, device="cpu")
    assert on_norm
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert folded_for_inference(plain) is plain


def test_chunked_evaluation_equals_one_batch():
    model = _trained_statistics(build_model(num_classes=10, width_mult=0.25, stem="cifar_lite"))
    generator = torch.Generator().manual_seed(2)
    n = CPU_EVAL_CHUNK + 37
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    chunked = evaluate(model, images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=2 * n, device="cpu")
    assert chunked["count"] == n
    with torch.no_grad():
        logits = model(((images.float() / 255) - 0.5) / 0.25)
    assert chunked["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert chunked["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    assert model.training is False


def test_hook_objects_and_recording_modules_see_the_evaluation():
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)

    class Counter:  # a hook that is an object: the copy must call this one, not a copy of it
        calls = 0

        def __call__(self, module, inputs, output):
            self.calls += 1

    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")
    counter = Counter()
    model.features[1].register_forward_hook(counter)
    evaluate(model, images, labels, (0.5,) * 3, (0.25,) * 3, device="cpu")
    assert counter.calls == 1
    attention = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", attention="triplet")
    recorder = next(m for m in attention.modules() if hasattr(m, "record"))
    recorder.record = True
    assert folded_for_inference(attention) is attention  # what it records stays on the model
