"""Make ``import torchvision`` (and so ``import timm``) work next to the CPU-only torch wheel.

PyPI has no CPU build of torchvision: the torchvision wheel is a CUDA build whose ``_C.so`` does
not load next to ``torch+cpu``. Its Python side then registers fake kernels for
``torchvision::nms`` and fails with "operator torchvision::nms does not exist". Defining those op
schemas ourselves lets the import succeed; torchvision's C++ ops stay unavailable, which is fine:
we decode images with Pillow and use no detection ops. Where torchvision's ``_C`` loads (a matching
build), the first import succeeds and nothing here runs.
"""

from __future__ import annotations

import sys

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def import_torchvision() -> None:
    global _LIBRARY
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define(
        "qnms(Tensor qdets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    import torchvision  # noqa: F401


import_torchvision()
