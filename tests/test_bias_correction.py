"""Bias correction: under int8-rounded weights the corrected model's mean output is the float one's."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pipeline.export.bias_correction import WEIGHT_LEVELS, bias_corrected, rounding_error


class LinearChain(nn.Module):
    """uint8 NHWC in (the contract), then conv -> depthwise 3x3 -> mean -> linear, nothing
    nonlinear in between, so a layer's input mean decides its output mean exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, bias=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().permute(0, 3, 1, 2) / 255
        return self.fc(self.depthwise(self.conv(x)).mean((2, 3)))


def flat_photos(count: int = 40) -> np.ndarray:
    """One colour per photo: valid convs see the same values at every position, so the mean over
    positions is the mean of each window too (no border effect)."""
    colours = np.random.default_rng(0).integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (count, 12, 12, 3)))


def with_rounded_weights(model: nn.Module) -> nn.Module:
    """The model as an INT8 driver would round its weights (per channel, symmetric, max |w| / 127)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight += rounding_error(layer.weight)
    return model


def mean_output(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).mean(0).numpy()


def test_rounding_error_is_the_symmetric_per_channel_int8_grid() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.3333], [2.0, 0.01, -0.02]])
    rounded = weight + rounding_error(weight)
    for row, original in zip(rounded, weight, strict=True):
        scale = original.abs().max() / WEIGHT_LEVELS
        levels = row / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
        assert (row - original).abs().max() <= scale / 2 + 1e-7  # the nearest level
    assert float(rounded[0, 1]) == -1.0 and float(rounded[1, 0]) == 2.0  # the extremes are levels


def test_bias_correction_restores_the_mean_output_under_rounded_weights() -> None:
    torch.manual_seed(0)
    model = LinearChain().eval()
    with torch.no_grad():  # a large input mean and coarse depthwise weights: a clear shift
        model.conv.weight.add_(0.3)
    images = flat_photos()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corrected = bias_corrected(model, images)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    assert corrected.conv.bias is not None  # a bias where the layer had none

    float_mean = mean_output(model, images)
    plain_shift = np.abs(mean_output(with_rounded_weights(copy.deepcopy(model)), images) - float_mean).max()
    corrected_shift = np.abs(mean_output(with_rounded_weights(corrected), images) - float_mean).max()
    assert plain_shift > 1e-3
    assert corrected_shift < plain_shift / 50


class TokensAndSpare(nn.Module):
    """A linear over tokens (as a vision transformer's) and a conv that the forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(3, 5)
        self.spare = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x.float().flatten(1, 2) / 255).mean(1)


def test_bias_correction_takes_token_inputs_and_skips_unused_layers() -> None:
    torch.manual_seed(0)
    model = TokensAndSpare().eval()
    images = flat_photos()
    corrected = bias_corrected(model, images)
    assert torch.equal(corrected.spare.bias, model.spare.bias)  # never run: left as it is
    float_mean = mean_output(model, images)
    plain_shift = np.abs(mean_output(with_rounded_weights(copy.deepcopy(model)), images) - float_mean).max()
    corrected_shift = np.abs(mean_output(with_rounded_weights(corrected), images) - float_mean).max()
    assert corrected_shift < plain_shift / 50
