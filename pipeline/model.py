"""Model presets (timm), where their ImageNet weights come from, and the input-contract wrapper.

Presets are data: a short name, the timm architecture, and the file name of its weights in a local
weights folder. Any other timm model name works too. Weights come from, in this order:
``--weights PATH``; ``$TRASHSORT_WEIGHTS_DIR`` (a folder of ``<arch>*.pth`` files); the Hugging Face
Hub. ``pretrained=False`` starts from random weights (tests, experiments).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from edge.bundle import sha256_file
from pipeline.manifest import InputSpec, ModelInfo, Preprocess

WEIGHTS_DIR_ENV = "TRASHSORT_WEIGHTS_DIR"


class WeightsError(ValueError):
    """Pretrained weights that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class Preset:
    arch: str
    hub_tag: str = "in1k"


PRESETS: dict[str, Preset] = {
    "mobilenetv3_small": Preset("tf_mobilenetv3_small_100"),
    "efficientnet_lite0": Preset("tf_efficientnet_lite0"),
}
DEFAULT_PRESET = "mobilenetv3_small"


def resolve_arch(name: str) -> tuple[str, str | None]:
    """A preset name or any timm model name -> (timm architecture, preset name or None)."""
    if name in PRESETS:
        return PRESETS[name].arch, name
    if name in timm.list_models() or timm.is_model(name):
        return name, None
    raise WeightsError(
        f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm model name"
    )


def find_local_weights(arch: str, weights_dir: str | Path | None = None) -> Path | None:
    """A ``<arch>*.pth`` file in the weights folder (argument or $TRASHSORT_WEIGHTS_DIR), if any."""
    folder = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder not found (from ${WEIGHTS_DIR_ENV})")
    # "arch." or "arch-": tf_mobilenetv3_small_100 must not match tf_mobilenetv3_small_100_minimal
    matches = sorted(p for p in folder.glob(f"{arch}*.pth") if p.name[len(arch)] in ".-")
    return matches[0] if matches else None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def create_model(
    name: str, num_classes: int, *, pretrained: bool = True, weights: str | Path | None = None,
    drop_rate: float = 0.2, drop_path_rate: float = 0.0,
) -> tuple[nn.Module, ModelInfo]:
    """A timm model with a fresh ``num_classes`` head on ImageNet features, and where they came from.

    ``drop_rate``: dropout before the classifier; ``drop_path_rate``: stochastic depth in the blocks
    (both training-time only)."""
    arch, preset = resolve_arch(name)
    regularization = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
    if not pretrained:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **regularization)
        return model, ModelInfo(arch=arch, preset=preset, weights_source="none")

    model, info = _pretrained(arch, preset, weights, regularization)
    model.reset_classifier(num_classes)
    return model, info


def imagenet_model(name: str, weights: str | Path | None = None) -> nn.Module:
    """The pretrained model with its own ImageNet classifier (the teacher of ``--imagenet-distill``)."""
    arch, preset = resolve_arch(name)
    return _pretrained(arch, preset, weights, {})[0]


def _pretrained(arch: str, preset: str | None, weights: str | Path | None,
                regularization: dict[str, float]) -> tuple[nn.Module, ModelInfo]:
    """The ImageNet model with its classifier, from ``weights``, the weights folder or the Hub."""
    weights_path = Path(weights) if weights else find_local_weights(arch)
    if weights_path is not None:
        state = load_state_dict(weights_path)
        model = timm.create_model(arch, pretrained=False, num_classes=_head_size(model_state=state),
                                  **regularization)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise WeightsError(f"{weights_path}: does not fit {arch} ({first})") from None
        return model, ModelInfo(arch=arch, preset=preset, weights_source=f"file:{weights_path.name}",
                                weights_sha256=sha256_file(weights_path))

    tag = f"{arch}.{PRESETS[preset].hub_tag}" if preset else arch
    advice = (f"Pass --weights PATH, set ${WEIGHTS_DIR_ENV} to a folder holding {arch}*.pth, "
              "or use --no-pretrained.")
    if not hub_reachable():
        raise WeightsError(f"no ImageNet weights for {arch}: the Hugging Face Hub is unreachable and "
                           f"no local file was given. {advice}")
    try:
        model = timm.create_model(tag, pretrained=True, **regularization)
    except Exception as e:
        raise WeightsError(f"could not download {tag} from the Hub ({type(e).__name__}: {e}). {advice}") from None
    return model, ModelInfo(arch=arch, preset=preset, weights_source=f"hub:{tag}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before downloading: an unreachable Hub otherwise costs minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _head_size(model_state: dict[str, torch.Tensor]) -> int:
    """Classes of the head in an ImageNet state dict (the last 2-D weight named like a classifier)."""
    for key in ("classifier.weight", "head.fc.weight", "fc.weight", "head.weight"):
        if key in model_state:
            return model_state[key].shape[0]
    return 1000


def preprocess_for(model: nn.Module, size: int | None = None) -> Preprocess:
    """The manifest's preprocessing from the model's pretrained config (mean/std, crop, resize rule)."""
    cfg = model.pretrained_cfg
    height = size or cfg["input_size"][1]
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    return Preprocess(
        size=[height, height], crop_pct=float(cfg.get("crop_pct", 0.875)), interpolation=interpolation,
        input=InputSpec(layout="NHWC", dtype="uint8", normalized_in_graph=True,
                        mean=[float(m) for m in cfg["mean"]], std=[float(s) for s in cfg["std"]]),
    )


class Normalize(nn.Module):
    """float (N, 3, H, W) in [0, 1] -> normalized with the manifest's mean/std."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ContractModel(nn.Module):
    """The model as every artefact sees it: RGB uint8 NHWC in, logits out (normalization inside)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        mean, std = torch.tensor(preprocess.input.mean), torch.tensor(preprocess.input.std)
        # (x / 255 - mean) / std as one multiply-add. Cast first: ExecuTorch runs the uint8 -> float
        # cast outside XNNPACK, and a uint8 permute before it would run there too. Multiply-add after
        # the permute: on NHWC pixels the per-channel constants broadcast over an innermost dimension
        # of 3, which XNNPACK runs slowly (ExecuTorch stem: fp32 1.8 -> 1.2 ms, INT8 3.0 -> 1.7 ms;
        # onnxruntime fp32 2.5 -> 1.1 ms; LiteRT the same either way).
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels -> the network's normalized float NCHW input."""
        return x.float().permute(0, 3, 1, 2) * self.scale + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.inputs(x))


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of tensor names and bytes, independent of how a checkpoint file was pickled."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def classifier_prefix(model: nn.Module) -> str:
    """The state-dict prefix of a timm model's classifier head (``classifier``, ``head.fc``, ...)."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise ValueError(f"{type(model).__name__}: no classifier module found")


def backbone_sha256(model: nn.Module) -> str:
    """The hash of every weight and batch-norm statistic except the classifier head's."""
    prefix = classifier_prefix(model) + "."
    return state_sha256({k: v for k, v in model.state_dict().items() if not k.startswith(prefix)})
