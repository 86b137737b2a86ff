"""Where frames come from: image files, folders, globs, video files, a Pi camera or a USB camera.

Every source yields ``Frame``s holding RGB uint8 HxWx3 arrays. Cameras are opened through an
injectable ``open_device`` (so tests, and other camera stacks, plug in without hardware): a device
has ``read() -> RGB array | None`` and ``close()``. A camera that is missing, or lost mid-run, is
retried a few times and then ends the run with ``CameraError`` and a clear message.
"""

from __future__ import annotations

import glob
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.preprocess import ImageDecodeError, load_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


class SourceError(ValueError):
    """A source that cannot be read at all (a path that does not exist, a video OpenCV cannot open)."""


class CameraError(RuntimeError):
    """A camera that is not there, or stopped giving frames, after the retries."""


@dataclass
class Frame:
    source: str  # a file path, "video.mp4#frame", or "usb:0#frame"
    image: np.ndarray  # RGB uint8 HxWx3


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --- files, folders, globs, videos ---------------------------------------------------------

def expand_paths(sources: Iterable[str]) -> list[Path]:
    """Files named, folder contents (images and videos, sorted), glob matches; a missing path is an error."""
    paths: list[Path] = []
    for source in sources:
        if any(ch in source for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
            if not matches:
                raise SourceError(f"{source}: no file matches this pattern")
            paths += [m for m in matches if m.is_file()]
        elif Path(source).is_dir():
            paths += sorted(p for p in Path(source).iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif Path(source).is_file():
            paths.append(Path(source))
        else:
            raise SourceError(f"{source}: no such file or folder")
    return paths


def file_frames(paths: Iterable[Path], every: int = 1) -> Iterator[Frame]:
    """Images (unreadable ones skipped with a warning) and every ``every``-th frame of videos."""
    for path in paths:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            yield from video_frames(path, every)
            continue
        try:
            yield Frame(str(path), np.asarray(load_rgb(path)))
        except ImageDecodeError as e:
            warn(f"skipped {e}")


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise SourceError("video files and USB cameras need OpenCV: pip install opencv-python-headless") from None
    return cv2


def video_frames(path: Path, every: int = 1) -> Iterator[Frame]:
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"{path}: OpenCV cannot open this video")
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if index % every == 0:
                yield Frame(f"{path}#{index}", np.ascontiguousarray(bgr[..., ::-1]))
            index += 1
    finally:
        capture.release()


# --- cameras --------------------------------------------------------------------------------

class Device(Protocol):
    def read(self) -> np.ndarray | None: ...
    def close(self) -> None: ...


class PicameraDevice:
    """picamera2 (Raspberry Pi camera). Its "RGB888" format is B, G, R in memory: flipped here."""

    def __init__(self, size: tuple[int, int] = (640, 480), camera: Any = None) -> None:
        if camera is None:
            try:
                from picamera2 import Picamera2
            except ImportError:
                raise CameraError("picamera2 is not installed (Raspberry Pi OS: sudo apt install "
                                  "python3-picamera2, and a venv made with --system-site-packages)") from None
            try:
                camera = Picamera2()
            except (RuntimeError, IndexError) as e:
                raise CameraError(f"no Raspberry Pi camera found ({e})") from None
        self.camera = camera
        self.camera.configure(self.camera.create_preview_configuration(main={"format": "RGB888", "size": size}))
        self.camera.start()

    def read(self) -> np.ndarray | None:
        bgr = self.camera.capture_array()
        return None if bgr is None else np.ascontiguousarray(bgr[..., :3][..., ::-1])

    def close(self) -> None:
        self.camera.stop()
        self.camera.close()


class OpenCVDevice:
    """A USB (V4L2) camera through OpenCV, which gives BGR frames: flipped to RGB here."""

    def __init__(self, index: int = 0, capture: Any = None) -> None:
        self.capture = capture if capture is not None else _cv2().VideoCapture(index)
        if not self.capture.isOpened():
            self.capture.release()
            raise CameraError(f"no USB camera at index {index} (is it plugged in? see /dev/video*)")

    def read(self) -> np.ndarray | None:
        ok, bgr = self.capture.read()
        return np.ascontiguousarray(bgr[..., ::-1]) if ok and bgr is not None else None

    def close(self) -> None:
        self.capture.release()


def open_camera_device(spec: str) -> Callable[[], Device]:
    """``picamera`` or ``usb[:N]`` to a function that opens that camera."""
    if spec == "picamera":
        return PicameraDevice
    if spec == "usb" or spec.startswith("usb:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise SourceError(f"--camera {spec}: expected usb or usb:N (N a camera index)")
        return lambda: OpenCVDevice(int(index))
    raise SourceError(f"--camera {spec}: expected picamera, usb or usb:N")


def camera_frames(name: str, open_device: Callable[[], Device], every: int = 1, max_frames: int | None = None,
                  retries: int = 3, retry_delay: float = 1.0,
                  sleep: Callable[[float], None] = time.sleep) -> Iterator[Frame]:
    """Frames from a camera; when it fails to open or to give a frame, close it, wait, reopen, up to
    ``retries`` times in a row, then raise CameraError."""
    device: Device | None = None
    failures, index, yielded = 0, 0, 0
    try:
        while max_frames is None or yielded < max_frames:
            try:
                if device is None:
                    device = open_device()
                rgb = device.read()
                if rgb is None:
                    raise CameraError(f"camera {name} returned no frame")
            except (CameraError, OSError, RuntimeError) as e:
                failures += 1
                if device is not None:
                    _close_quietly(device)
                    device = None
                if failures > retries:
                    raise CameraError(f"camera {name}: {e}; gave up after {retries} retries") from None
                warn(f"camera {name}: {e}; retrying in {retry_delay:g} s ({failures}/{retries})")
                sleep(retry_delay)
                continue
            failures = 0
            if index % every == 0:
                yield Frame(f"{name}#{index}", rgb)
                yielded += 1
            index += 1
    finally:
        if device is not None:
            _close_quietly(device)


def _close_quietly(device: Device) -> None:
    try:
        device.close()
    except Exception as e:  # a camera that is already gone may fail to close; that is not news
        warn(f"closing the camera failed: {e}")
