"""What the offline bundle holds: every package slipstream needs beyond a bare CUDA node's base
image (Python 3.12 with torch, triton, timm, numba, numpy, opencv-python-headless, pillow,
safetensors, tqdm, pyyaml, tensorboard and what those need), in two tiers.

Tier 1 runs the loss kernels and the training step: DeepSpeed, FFCV, open_clip and slipstream.
Tier 2 adds DALI and its codec libraries, the bulk of the bytes.

A `core` package is always installed. A `dependency` is installed only when the node's own
environment has no version that satisfies what the bundle's packages ask of it: a copy on
PYTHONPATH would shadow the image's own (torch's typing-extensions, say) for every program.
Versions are those of the project's own environment (`make setup`), which CI tests.
"""
from __future__ import annotations

from dataclasses import dataclass

PYTHON = "3.12"
# pip's platform tags for a CPython 3.12 manylinux x86_64 node; pip matches each exactly.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (39, 38, 36, 35, 34, 31, 28, 27, 24, 17)) + ("manylinux2014_x86_64", "manylinux1_x86_64")
PART_BYTES = 55 * 2**20  # the most a transfer to the node carries in one piece


@dataclass(frozen=True)
class Package:
    name: str  # the distribution's name on PyPI
    tier: int
    role: str  # "core" | "dependency"
    build: str = "wheel"  # "wheel": a binary wheel from PyPI; "pure": built here from its sdist; "ffcv": see tools/ffcv_wheel.py; "local": this project


PACKAGES: tuple[Package, ...] = (
    # tier 1: DeepSpeed (its CUDA ops JIT-build on the node, which has nvcc and ninja) and what it imports
    Package("deepspeed", 1, "core", "pure"),
    Package("einops", 1, "dependency"),
    Package("hjson", 1, "dependency"),
    Package("msgpack", 1, "dependency"),
    Package("ninja", 1, "dependency"),
    Package("psutil", 1, "dependency"),
    Package("py-cpuinfo", 1, "dependency"),
    Package("pydantic", 1, "dependency"),
    Package("pydantic-core", 1, "dependency"),
    Package("annotated-types", 1, "dependency"),
    Package("typing-inspection", 1, "dependency"),
    Package("typing-extensions", 1, "dependency"),
    # FFCV for cp312 with OpenCV linked in statically; its other requirements are for its
    # benchmarks and transforms, which slipstream never imports.
    Package("ffcv", 1, "core", "ffcv"),
    # open_clip: the CLIP tokenizer and the zero-shot metadata
    Package("open-clip-torch", 1, "core"),
    Package("ftfy", 1, "dependency"),
    Package("wcwidth", 1, "dependency"),
    Package("regex", 1, "dependency"),
    Package("slipstream", 1, "core", "local"),
    # tier 2: DALI, its codec libraries (found by relative path: they share its target folder)
    Package("nvidia-dali-cuda120", 2, "core"),
    Package("nvidia-nvimgcodec-cu12", 2, "core"),
    Package("nvidia-nvjpeg-cu12", 2, "core"),
    Package("nvidia-nvjpeg2k-cu12", 2, "core"),
    Package("nvidia-nvtiff-cu12", 2, "core"),
    Package("nvidia-libnvcomp-cu12", 2, "core"),
    Package("astunparse", 2, "dependency"),
    Package("gast", 2, "dependency"),
    Package("six", 2, "dependency"),
    Package("optree", 2, "dependency"),
    Package("makefun", 2, "dependency"),
    Package("libcst", 2, "dependency"),
    Package("nvtx", 2, "dependency"),
    Package("packaging", 2, "dependency"),  # DALI asks for <= 26.3: a node with a newer one gets this
)

# What each tier must import once installed (tier 2 on top of tier 1).
IMPORTS = {1: ("deepspeed", "ffcv", "open_clip", "trainer.engine", "slip.main"), 2: ("nvidia.dali",)}
