"""FFCV, imported once here so its import-time side effect is undone.

Importing ffcv calls torch.set_num_threads(1) (its compiler's default), which would make
every later torch op in the process single-threaded: a 2x slower CPU training step.
"""
import torch

_threads = torch.get_num_threads()
from ffcv.fields import BytesField, IntField, NDArrayField, RGBImageField  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.types import HeaderType  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

torch.set_num_threads(_threads)

__all__ = ["IMAGE_MODES", "BytesField", "DatasetWriter", "HeaderType", "IntField", "NDArrayField", "RGBImageField", "Reader"]
