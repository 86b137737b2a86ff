"""Golden vectors for the Android core's JVM tests, written by the Python pipeline's own code.

    python android_demo/write_golden.py OUT_DIR [--manifest BUNDLE/manifest.json]

- photos (real TrashNet photos when ../shared is there, and generated ones of camera-like and odd
  sizes) as ARGB int32 pixels, with the input tensor ``edge/preprocess.py`` makes of them: the
  Kotlin preprocessing must give the same bytes;
- random logits with their softmax and top-k (``edge/runtimes.py``): Kotlin must agree within 1e-6;
- the manifest the tests parse (a real export's, ``core/src/test/resources/manifest.json`` by default);
- a head update: a small model converted by litert-torch (fp32, and INT8 as the pipeline exports it), a
  new head for it, and the file ``edge/head.py`` rebuilds from them: ``HeadUpdate.kt`` must write the
  same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge.preprocess import load_rgb, model_input  # noqa: E402
from edge.runtimes import softmax  # noqa: E402

HERE = Path(__file__).resolve().parent
TRASHNET = HERE.parent.parent / "shared" / "datasets" / "trashnet"
SIZES = [(640, 480), (480, 640), (300, 300), (999, 257), (225, 225), (1280, 720)]


def argb(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> Android ARGB_8888 ints (opaque)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((0xFF << 24) | (r << 16) | (g << 8) | b).astype(np.uint32).view(np.int32)


def photos() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = [(p.name, np.asarray(load_rgb(p))) for p in sorted(TRASHNET.glob("*/*7.jpg"))[:3]]
    for w, h in SIZES:
        smooth = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(smooth).resize((w, h), Image.Resampling.BICUBIC)  # photo-like gradients
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
        out.append((f"generated_{w}x{h}", noisy.astype(np.uint8)))
    return out


def write_head_update(out: Path) -> dict:
    """previous.tflite (converted as the pipeline converts), head_fp32.bin (a 5-class head),
    rebuilt.tflite (edge/head.py's result) and rebuilt_again.tflite (that one with 3 of the classes);
    what the test needs to know of them."""
    import torch  # only here: the rest of this script needs no torch
    from torch import nn

    from edge.bundle import sha256_file
    from edge.head import head_bytes, with_new_head
    from edge.runtimes import captured_output

    out.mkdir()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with captured_output():  # what litert-torch's imports and converter print
        import litert_torch

        previous = bytes(litert_torch.convert(model.eval(), (torch.rand(1, 3, 16, 16),)).model_content())
    weight = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    bias = np.arange(5, dtype=np.float32) - 2
    (out / "previous.tflite").write_bytes(previous)
    (out / "head_fp32.bin").write_bytes(head_bytes(weight, bias))
    rebuilt = with_new_head(previous, weight, bias)
    (out / "rebuilt.tflite").write_bytes(rebuilt)
    (out / "rebuilt_again.tflite").write_bytes(with_new_head(rebuilt, weight[:3], bias[:3]))  # a second update
    files = ["previous.tflite", "head_fp32.bin", "rebuilt.tflite", "rebuilt_again.tflite"]
    files += write_int8_head_update(out, model, weight, bias)
    return {name: sha256_file(out / name) for name in files} | {"shape": list(weight.shape)}


def write_int8_head_update(out: Path, model, weight: np.ndarray, bias: np.ndarray) -> list[str]:
    """The same for an INT8 .tflite, full-integer as the pipeline exports it: previous_int8.tflite,
    head_int8.bin (the 5-class head quantized by the pipeline), rebuilt_int8.tflite and
    rebuilt_again_int8.tflite (3 of the classes); the file names."""
    import torch

    from edge.head import head_bytes, read_classifier, with_new_head
    from edge.runtimes import captured_output
    from pipeline.export import tflite as tflite_driver

    class Contract(torch.nn.Module):  # uint8 NHWC in, as every artefact
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2).float() / 255)

    calibration = np.random.default_rng(5).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    contract = Contract().eval()
    with captured_output():
        previous = tflite_driver.export(contract, "int8", calibration)
        with torch.no_grad():
            features = contract.net[:-1](torch.from_numpy(calibration).permute(0, 3, 1, 2).float() / 255).numpy()
        written = tflite_driver.with_new_head(previous, weight, bias, features)
    head = read_classifier(written)  # the 5-class head as the pipeline quantized it
    (out / "previous_int8.tflite").write_bytes(previous)
    (out / "head_int8.bin").write_bytes(head_bytes(*head))
    rebuilt = with_new_head(previous, *head)
    (out / "rebuilt_int8.tflite").write_bytes(rebuilt)
    weight_q, bias_q, q = head
    three = type(q)(q.weight_scale[:3], q.bias_scale[:3], q.output_scale, q.output_zero_point)
    (out / "rebuilt_again_int8.tflite").write_bytes(with_new_head(rebuilt, weight_q[:3], bias_q[:3], three))
    return ["previous_int8.tflite", "head_int8.bin", "rebuilt_int8.tflite", "rebuilt_again_int8.tflite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--manifest", type=Path, default=HERE / "core/src/test/resources/manifest.json")
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = json.loads(args.manifest.read_text())
    shutil.copy(args.manifest, out / "manifest.json")

    settings = [manifest["preprocess"],
                {**manifest["preprocess"], "size": [32, 32], "interpolation": "bicubic"},
                {**manifest["preprocess"], "size": [160, 160], "crop_pct": 0.9}]
    cases = []
    for name, rgb in photos():
        pixels = f"{Path(name).stem}.argb"
        argb(rgb).astype("<i4").tofile(out / pixels)
        for j, pre in enumerate(settings):
            case = f"{Path(name).stem}_{j}"
            model_input(Image.fromarray(rgb), pre).tofile(out / f"{case}.u8")
            cases.append({"name": case, "pixels": pixels, "width": rgb.shape[1], "height": rgb.shape[0],
                          "size": pre["size"], "crop_pct": pre["crop_pct"], "interpolation": pre["interpolation"]})

    rng = np.random.default_rng(11)
    k = len(manifest["classes"])
    scores = []
    for scale in (0.5, 3.0, 12.0):
        logits = (rng.normal(size=(1, k)) * scale).astype(np.float32)
        probs = softmax(logits.astype(np.float64))[0]
        scores.append({"logits": logits[0].tolist(), "probs": probs.tolist(),
                       "top_k": np.argsort(-probs, kind="stable")[:3].tolist()})
    head_update = write_head_update(out / "head_update")
    (out / "index.json").write_text(json.dumps({"cases": cases, "scores": scores, "head_update": head_update},
                                               indent=1))
    print(f"wrote {len(cases)} preprocessing cases and {len(scores)} score cases to {out}")


if __name__ == "__main__":
    main()
