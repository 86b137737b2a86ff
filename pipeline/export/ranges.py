"""INT8 activation ranges, one rule for the drivers that set ranges themselves (LiteRT, ONNX).

A tensor's range is the 99th percentile of its per-photo minima and maxima over the calibration
photos. The plain min/max over all photos lets one outlier photo stretch a range for everyone; a
moving average (ai-edge-quantizer's default update) under-covers MobileNetV3's hardswish layers. On
the fine-tuned MobileNetV3-Small, INT8 ``.tflite`` val top-1: 87.9 % with min/max, 91.6 % with this
(before equalization). The 99th percentile beat the 95th, the 99.9th and min/max in KL divergence
from the float model on held-out training photos, never val (README).

The input, the contract's uint8 pixels cast to float, is pinned to [0, 255] instead: int8 scale 1
and zero point -128 represent every pixel exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INPUT_RANGE = (0.0, 255.0)
RANGE_PERCENTILE = 99.0


def percentile_range(mins: Sequence[np.ndarray], maxs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A tensor's (min, max) from each calibration photo's minimum and maximum (same shapes)."""
    return (np.percentile(np.stack(mins), 100 - RANGE_PERCENTILE, axis=0).astype(np.float32),
            np.percentile(np.stack(maxs), RANGE_PERCENTILE, axis=0).astype(np.float32))
