"""The step profile on a GPU: CUDA-event stages add up to the wall-clock step, DALI decodes on the GPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_gpu_stages_add_up_to_the_step(tmp_path: Path, make_shapes_beton) -> None:
    from trainer.config import load_config
    from trainer.step_profile import profile_step

    beton = make_shapes_beton(tmp_path, train_size=64)
    cfg = load_config("tiny_cpu", [f"data.train={beton}", "data.batch_size=32", "engine.device=cuda", "engine.precision=bf16"])
    r = profile_step(cfg, warmup=2, steps=5)
    assert r["loader"] == "dali-gpu" and r["device"].startswith("cuda")
    for step in r["per_step"]:
        assert abs(sum(step["stages_ms"].values()) - step["step_ms"]) <= 0.10 * step["step_ms"]
    assert r["stages_ms"]["vision_fwd"] > 0 and r["stages_ms"]["backward"] > 0 and 0 < r["mfu"] < 1
    cpu_decode = profile_step(load_config("tiny_cpu", [f"data.train={beton}", "data.batch_size=32", "engine.device=cuda",
                                                       "data.device=cpu"]), warmup=2, steps=3)  # fmt: skip
    assert cpu_decode["loader"] == "dali-cpu" and cpu_decode["stages_ms"]["h2d"] > 0
