"""Activation equalization: float-identical, every ReLU channel spans the tensor's range, less INT8 error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.export.equalize import channel_maxima, equalize_activations, find_boundaries
from pipeline.model import ContractModel, create_model, preprocess_for

SIZE = 32


def contract_model(name: str) -> ContractModel:
    torch.manual_seed(0)
    model, _ = create_model(name, 3, pretrained=False)
    return ContractModel(model.eval(), preprocess_for(model, size=SIZE)).eval()


def photos(count: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def unbalance(model: ContractModel) -> None:
    """Shrink half the channels after blocks.1.0's first ReLU 50x (and undo it in the next conv):
    the same function, with the channel spread that INT8 handles badly."""
    block = model.model.blocks[1][0]
    half = block.bn1.num_features // 2
    with torch.no_grad():
        block.bn1.weight[:half] *= 0.02
        block.bn1.bias[:half] *= 0.02
        block.conv_dw.weight[:half] /= 0.02


def test_mobilenetv3_equalized_is_the_same_function_with_balanced_channels() -> None:
    model = contract_model("mobilenetv3_small")
    unbalance(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = photos()
    equalized, count = equalize_activations(model, images)

    # ReLU boundaries of MobileNetV3-Small: blocks.0.0 (before its SE) and both convs of blocks.1.*
    assert count == 5 == len(find_boundaries(equalized))
    with torch.no_grad():
        x = torch.from_numpy(images)
        torch.testing.assert_close(equalized(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model is untouched"

    # channel maxima c become M^s * c^(1 - s): the spread max/min shrinks to its (1 - s) power, to 1
    # where only a depthwise conv reads the channels (s = 1)
    before_maxima = channel_maxima(model, [b.norm for b in find_boundaries(model)], images)
    boundaries = find_boundaries(equalized)
    after_maxima = channel_maxima(equalized, [b.norm for b in boundaries], images)
    assert {b.strength for b in boundaries} == {0.5, 1.0}
    for boundary, before_max, after_max in zip(boundaries, before_maxima, after_maxima, strict=True):
        active = before_max > 0
        spread_before = float(before_max[active].max() / before_max[active].min())
        spread_after = float(after_max[active].max() / after_max[active].min())
        assert spread_after == pytest.approx(spread_before ** (1 - boundary.strength), rel=1e-3)
    unbalanced = before_maxima[1]  # blocks.1.0.bn1
    assert unbalanced.max() > 10 * unbalanced[unbalanced > 0].min()  # the test model really was unbalanced


def test_relu6_networks_are_left_alone() -> None:
    model = contract_model("efficientnet_lite0")
    assert find_boundaries(model) == []
    equalized, count = equalize_activations(model, photos(4))
    assert count == 0
    assert all(torch.equal(a, b) for a, b in zip(equalized.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_equalization_cuts_int8_error() -> None:
    """One inverted-residual block whose first ReLU's channels span 50x: equalized, INT8 error drops."""
    from timm.models._efficientnet_blocks import InvertedResidual

    from pipeline.export import executorch as et_driver

    torch.manual_seed(0)
    model = torch.nn.Sequential(InvertedResidual(8, 8, exp_ratio=4, noskip=True)).eval()
    block = model[0]
    with torch.no_grad():
        for norm in (block.bn1, block.bn2, block.bn3):
            norm.running_var.uniform_(0.5, 2.0)
            norm.bias.uniform_(0.0, 0.5)
        block.bn1.weight[:16] *= 0.02  # and bias: the same function with half the channels 50x smaller
        block.bn1.bias[:16] *= 0.02
        block.conv_dw.weight[:16] /= 0.02
    inputs = torch.randn(32, 8, 8, 8)
    with torch.no_grad():
        reference = model(inputs)

    def int8_error(candidate: torch.nn.Module) -> float:
        exported = torch.export.export(candidate, (inputs[:1],), strict=False)
        quantized = et_driver._quantize(exported, inputs.numpy())
        with torch.no_grad():
            out = torch.cat([quantized(x[None]) for x in inputs])
        return float((out - reference).abs().mean() / reference.abs().mean())

    equalized, count = equalize_activations(model, inputs.numpy())
    assert count == 2
    assert int8_error(equalized) < 0.3 * int8_error(model)
