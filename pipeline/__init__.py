"""trashsort's training and packaging pipeline (torch side). See README.md."""

# Before anything in this package imports timm (which imports torchvision): make torchvision
# importable next to the CPU-only torch wheel. See _torchvision_compat.py for why.
from pipeline import _torchvision_compat  # noqa: F401
