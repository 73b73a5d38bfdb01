"""`make bundle-check`: the offline bundle rehearsed here, as a bare CUDA node would meet it.

A Python 3.12 virtual environment gets what such a node's image has (torch, triton, timm,
numba, numpy, opencv-python-headless, pillow, safetensors, tqdm, pyyaml, tensorboard, pytest),
installed normally; then the bundle goes in with nothing but its own install script
(`pip install --no-index`). Tier 1 alone must import slipstream, answer `slip --help`, pass
the loss kernels' unit tests and run a training step on the synthetic loader; tier 2 on top
must import DALI and build slipstream's three-view graph. Everything runs outside the
checkout, so the code under test is the bundle's, not this tree's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle import REPO, find_python312  # noqa: E402

BASE_IMAGE = ["torch", "timm", "numba", "numpy", "opencv-python-headless", "pillow", "safetensors", "tqdm", "pyyaml", "tensorboard", "pytest"]
DALI_GRAPH = """
import io
import numpy as np
from PIL import Image
from pipeline.augment import three_view_pipeline
from pipeline.augment_config import AugmentConfig

def jpeg(seed):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(out, format="JPEG")
    return np.frombuffer(out.getvalue(), dtype=np.uint8)

source = lambda info: ([jpeg(0), jpeg(1)], np.array([[0], [1]], dtype=np.int64))
pipe = three_view_pipeline(source, ("image", "aug1", "aug2"), AugmentConfig(image_size=64), batch_size=2, num_threads=1)
index, *views = pipe.run()
shapes = [tuple(np.asarray(v.as_tensor()).shape) for v in views]
assert shapes == [(2, 3, 64, 64)] * 3, shapes
print("  DALI made the three views:", shapes)
"""

def step(title: str, cmd: list[str], **kw) -> None:
    print(f"bundle-check: {title}", flush=True)
    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"bundle-check: failed: {title} (exit {proc.returncode})")


def main() -> int:
    bundle = REPO / "build" / "bundle"
    if not (bundle / "manifest.json").is_file():
        raise SystemExit("bundle-check: no build/bundle/manifest.json: run `make bundle` first")
    work = REPO / "build" / "rehearsal"
    venv, target, run = work / "venv", work / "site", work / "run"
    py = venv / "bin" / "python"
    if not (venv / ".base-image").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        step("a Python 3.12 environment like the node's base image", [find_python312(), "-m", "venv", str(venv)])
        step("its packages, installed normally", [str(py), "-m", "pip", "install", "-q", *BASE_IMAGE])
        (venv / ".base-image").touch()
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    (run / "tests" / "unit").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", run / "tests")
    shutil.copytree(REPO / "tests" / "unit" / "kernels", run / "tests" / "unit" / "kernels")
    # Nothing of the checkout on the path: the bundle's packages or nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CI="true", DS_ACCELERATOR="cpu", PIP_NO_INDEX="1")
    step("tier 1 from the bundle alone", [str(py), str(bundle / "install.py"), "--target", str(target), "--tiers", "1"], env=env)
    env["PYTHONPATH"] = str(target / "tier-1")
    env["PATH"] = f"{target / 'tier-1' / 'bin'}:{env['PATH']}"
    where = "import trainer, sys; assert trainer.__file__.startswith(sys.argv[1]), trainer.__file__; print('  slipstream from', trainer.__file__)"
    step("slipstream is the bundle's", [str(py), "-c", where, str(target)], cwd=run, env=env)
    step("slip --help", ["slip", "--help"], cwd=run, env=env, stdout=subprocess.DEVNULL)
    step("the loss kernels' unit tests", [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/kernels"], cwd=run, env=env)
    step("a training step on the synthetic loader (tier 1 only)",
         ["slip", "profile", "step", "--config", "tiny_cpu", "data.loader=synthetic", "data.batch_size=16", "--warmup", "1", "--steps", "1",
          "--same-process"], cwd=run, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    step("tier 2 on top", [str(py), str(bundle / "install.py"), "--target", str(target), "--tiers", "2"], env=env)
    env["PYTHONPATH"] = f"{target / 'tier-2'}:{target / 'tier-1'}"
    step("DALI and the three-view graph", [str(py), "-c", DALI_GRAPH], cwd=run, env=env)
    print("bundle-check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
