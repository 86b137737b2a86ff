"""Classify photos, videos or camera frames with a trashsort bundle, or validate the bundle on this device.

    python edge/classify.py --bundle dist/trashnet-mobilenetv3_small-v1 photos/ clip.mp4
    python edge/classify.py --bundle BUNDLE --camera picamera --every 5
    python edge/classify.py --bundle BUNDLE --validate
    python edge/classify.py --bundle NEW_BUNDLE --head-update-from OLD_BUNDLE --validate

Needs numpy, Pillow and one runtime (ai-edge-litert or tflite-runtime, onnxruntime, executorch);
OpenCV only for videos and USB cameras, picamera2 only for the Pi camera. Never imports torch
(except through the ExecuTorch runtime, whose bindings need it). Everything about the model, the
classes and the preprocessing is read from the bundle's manifest.

Exit status: 0 ok, 1 validation failed, 2 bad bundle or arguments, 3 camera lost.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `edge` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from edge.bundle import BundleInvalid, input_contract_problems, read_manifest, verify  # noqa: E402
from edge.head import apply_head_update  # noqa: E402
from edge.preprocess import model_input  # noqa: E402
from edge.runtimes import RuntimeMissing, choose_artefact, open_runner, softmax  # noqa: E402
from edge.sources import (  # noqa: E402
    CameraError,
    Frame,
    SourceError,
    camera_frames,
    expand_paths,
    file_frames,
    open_camera_device,
)
from edge.validate import validate_bundle  # noqa: E402

UNCERTAIN = "uncertain"


@dataclass
class Prediction:
    source: str
    label: str  # the top class, or "uncertain" below --min-confidence
    confidence: float
    top_k: list[tuple[str, float]]
    stream: str | None
    latency_ms: float

    def line(self) -> str:
        if self.label == UNCERTAIN:  # say what it hesitates between
            answer = f"{UNCERTAIN} ({', '.join(f'{name} {p:.2f}' for name, p in self.top_k)})"
        else:
            others = ", ".join(f"{name} {p:.2f}" for name, p in self.top_k[1:])
            answer = (f"{self.label}{f' [{self.stream}]' if self.stream else ''} {self.confidence:.2f}"
                      f"{f'  ({others})' if others else ''}")
        return f"{self.source}: {answer}  {self.latency_ms:.1f} ms"

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "label": self.label, "confidence": round(self.confidence, 6),
                           "stream": self.stream, "latency_ms": round(self.latency_ms, 3),
                           "top_k": [{"label": n, "p": round(p, 6)} for n, p in self.top_k]})


class Classifier:
    """One artefact of a verified bundle, loaded once; ``classify(rgb)`` for each frame."""

    def __init__(self, bundle: str | Path, backend: str | None = None, model: str | None = None,
                 threads: int | None = None) -> None:
        self.bundle = Path(bundle)
        self.manifest = verify(self.bundle)  # every sha256 checked before anything runs
        self.entry = choose_artefact(self.manifest, backend, model)
        self.classes = self.manifest["classes"]
        self.runner = open_runner(self.entry["format"], self.bundle / self.entry["file"], threads)
        problems = input_contract_problems(self.runner.io, self.manifest["preprocess"]["size"], len(self.classes))
        if problems:
            raise BundleInvalid(f"{self.bundle / self.entry['file']}: " + "; ".join(problems))

    def classify(self, frame: Frame, top_k: int = 3, min_confidence: float = 0.0) -> Prediction:
        tensor = model_input(Image.fromarray(frame.image), self.manifest["preprocess"])
        t0 = time.perf_counter()
        logits = self.runner(tensor[None])
        latency_ms = (time.perf_counter() - t0) * 1000
        probs = softmax(logits)[0]
        order = np.argsort(-probs)[:max(1, top_k)]
        best = self.classes[int(order[0])]
        confidence = float(probs[order[0]])
        confident = confidence >= min_confidence
        return Prediction(frame.source, best["name"] if confident else UNCERTAIN, confidence,
                          [(self.classes[int(i)]["name"], float(probs[i])) for i in order],
                          best.get("stream") if confident else None, latency_ms)


def save_annotated(frame: Frame, prediction: Prediction, folder: Path, index: int) -> Path:
    """The frame with its answer written on it, as a JPEG (temp file, then rename)."""
    image = Image.fromarray(frame.image)
    draw = ImageDraw.Draw(image)
    text = f"{prediction.label} {prediction.confidence:.2f}"
    draw.rectangle((0, 0, 8 + 7 * len(text), 20), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    stem = Path(frame.source.replace("#", "_")).stem
    path = folder / f"{index:05d}_{stem}_{prediction.label}.jpg"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        image.save(f, format="JPEG", quality=90)
    os.replace(tmp, path)
    return path


def frames_for(args: argparse.Namespace) -> Iterator[Frame]:
    if args.camera:
        return camera_frames(args.camera, open_camera_device(args.camera), every=args.every,
                             max_frames=args.max_frames)
    return file_frames(expand_paths(args.sources), every=args.every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classify.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sources: image files, folders (their images and videos), globs ('photos/*.jpg'), video "
               "files.\nExit status: 0 ok, 1 validation failed, 2 bad bundle or arguments, 3 camera lost.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="images, folders, globs or videos")
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder (dist/<name>-v<version>)")
    parser.add_argument("--camera", metavar="CAM", help="picamera (Raspberry Pi camera) or usb[:N] (OpenCV)")
    parser.add_argument("--backend", choices=["tflite", "executorch", "onnx"],
                        help="runtime to use (default: the best installed for the bundle)")
    parser.add_argument("--model", metavar="FILE",
                        help="artefact file of the bundle to run, e.g. model_int8.tflite")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime (default: its own)")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per frame (default: 3)")
    parser.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                        help=f"below this top-1 probability the answer is '{UNCERTAIN}' (default: 0)")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="classify every N-th video/camera frame (default: 1, all)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="stop a camera after N frames (default: run until stopped)")
    parser.add_argument("--save", type=Path, metavar="DIR", help="write annotated frames to DIR")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (and a JSON report)")
    parser.add_argument("--validate", action="store_true",
                        help="check sha256, tensors, golden set and latency on this device; no sources needed")
    parser.add_argument("--latency-runs", type=int, default=50, metavar="N",
                        help="timed runs in --validate (default and minimum: 50)")
    parser.add_argument("--head-update-from", type=Path, metavar="OLD_BUNDLE",
                        help="first rebuild the bundle's missing .tflite from OLD_BUNDLE's with the new head "
                             "(a head update: a new class list without downloading the model again)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.every < 1 or args.top_k < 1 or args.threads is not None and args.threads < 1:
        parser.error("--every, --top-k and --threads must be at least 1")
    if not (args.validate or args.sources or args.camera or args.head_update_from):
        parser.error("give SOURCE files/folders, --camera, --validate or --head-update-from")
    try:
        if args.head_update_from:
            written = apply_head_update(args.bundle, args.head_update_from)
            print(f"head update: rebuilt {', '.join(written) or 'nothing (no artefact missing)'} from "
                  f"{args.head_update_from}", file=sys.stderr)
            if not (args.validate or args.sources or args.camera):
                return 0
        if args.validate:
            status = run_validate(args)
            if status or not (args.sources or args.camera):
                return status
        return run_classify(args)
    except (BundleInvalid, RuntimeMissing, LookupError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CameraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def run_validate(args: argparse.Namespace) -> int:
    entry = choose_artefact(read_manifest(args.bundle), args.backend, args.model)
    report = validate_bundle(args.bundle, entry, args.threads, args.latency_runs)
    print(json.dumps(report.to_dict()) if args.json else report.text(), flush=True)
    return 0 if report.passed else 1


def run_classify(args: argparse.Namespace) -> int:
    classifier = Classifier(args.bundle, args.backend, args.model, args.threads)
    if not args.json:
        print(f"{classifier.entry['file']} ({classifier.entry['format']} {classifier.entry['precision']}), "
              f"{len(classifier.classes)} classes", file=sys.stderr)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    count = 0
    for frame in frames_for(args):
        prediction = classifier.classify(frame, args.top_k, args.min_confidence)
        print(prediction.to_json() if args.json else prediction.line(), flush=True)
        if args.save:
            save_annotated(frame, prediction, args.save, count)
        count += 1
    if count == 0:
        print("error: no readable image or frame in the sources", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
