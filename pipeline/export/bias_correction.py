"""Bias correction for INT8 weights: undo the mean shift that rounding the weights causes.

Rounding a layer's weights to int8 moves the mean of its outputs: with the rounding error
``D = W_q - W`` and the layer's per-channel input mean ``E[x]``, output channel ``o`` moves by
``e_o = sum D[o, i, kh, kw] E[x_i]``. A depthwise conv has nine weights per channel, too few for
their rounding errors to cancel, so its channels drift, and the drift adds up through the network.
Subtracting ``e`` from each layer's bias (a new bias where it had none; the batch norm after it is
folded in by every converter) makes the quantized layer's expected output the float layer's again.
This is the empirical bias correction of data-free quantization (Nagel et al., 2019), with
``E[x]`` measured on the calibration photos in the float model.

It is exact only for the weight grid it assumes: per output channel, symmetric, ``max |w| / 127``,
which is what ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric), ai-edge-quantizer's
``static_wi8_ai8`` recipe and onnxruntime's 8-bit weights use (its 7-bit ones: ``levels=64``). A
batch norm folded in scales a channel's weights and its grid together: the rounding is the same.
The corrected model is not float-identical (it is the float model plus ``-e``): only INT8 drivers
use it, and the parity gate compares their artefacts with the original model.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.export.equalize import run_with_hooks

WEIGHT_LEVELS = 127  # symmetric int8: [-127, 127]


def bias_corrected(model: nn.Module, calibration: np.ndarray, levels: int = WEIGHT_LEVELS) -> nn.Module:
    """A copy of ``model`` (a contract model: uint8 NHWC in) whose convs' and linears' biases absorb
    the mean shift of rounding their weights to int8 (grid ``max |w| / levels``), measured on
    ``calibration``."""
    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    input_means = _input_means(model, layers, calibration)
    with torch.no_grad():
        for layer in layers:
            if id(layer) not in input_means:  # not on the forward path
                continue
            shift = _output_shift(layer, rounding_error(layer.weight, levels), input_means[id(layer)])
            if layer.bias is None:
                layer.bias = nn.Parameter(-shift)
            else:
                layer.bias -= shift
    return model


def rounding_error(weight: torch.Tensor, levels: int = WEIGHT_LEVELS) -> torch.Tensor:
    """``W_q - W`` on the per-output-channel symmetric grid ``max |w| / levels``."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = (weight.abs().flatten(1).amax(1) / levels).clamp_min(1e-12).view(shape)
    return (weight / scale).round().clamp(-levels, levels) * scale - weight


def corrected_head_bias(weight: np.ndarray, bias: np.ndarray, features: np.ndarray,
                        levels: int = WEIGHT_LEVELS) -> np.ndarray:
    """A classifier's bias corrected as ``bias_corrected`` corrects it, its input mean taken from
    ``features`` (the calibration photos' embeddings): for a head written into an INT8 artefact."""
    weight64, features64 = (torch.from_numpy(np.array(a, np.float64)) for a in (weight, features))
    shift = rounding_error(weight64, levels) @ features64.mean(0)
    return (bias - shift.numpy()).astype(np.float32)


def _output_shift(layer: nn.Module, error: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """Each output channel's mean shift for an input of per-channel mean ``input_mean`` (a conv:
    as if the mean filled the whole kernel, i.e. away from the zero-padded border)."""
    if isinstance(layer, nn.Linear):
        return error @ input_mean
    kernel = input_mean.view(1, -1, 1, 1).expand(1, -1, *error.shape[2:]).contiguous()
    return F.conv2d(kernel, error, groups=layer.groups).view(-1)


def _input_means(model: nn.Module, layers: list[nn.Module], calibration: np.ndarray) -> dict[int, torch.Tensor]:
    """Each layer's per-channel input mean over the calibration photos (and positions, or tokens),
    by ``id``; a layer run twice per photo counts both inputs."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        per_sample = x.mean((2, 3)) if isinstance(layer, nn.Conv2d) else x.reshape(len(x), -1, x.shape[-1]).mean(1)
        sums[id(layer)] = sums.get(id(layer), 0) + per_sample.sum(0)
        counts[id(layer)] = counts.get(id(layer), 0) + len(x)

    run_with_hooks(model, calibration, [layer.register_forward_pre_hook(record) for layer in layers])
    return {key: total / counts[key] for key, total in sums.items()}
