"""The step profile on a GPU: CUDA-event stages add up to the wall-clock steps, DALI decodes on the GPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _adds_up(r: dict) -> None:
    steps = [sum(row.values()) for row in r["per_step"]]
    assert all(v >= 0 for row in r["per_step"] for v in row.values())
    assert abs(sum(steps) / len(steps) - r["wall_ms"]) <= 0.10 * r["wall_ms"]


def test_gpu_stages_add_up_to_the_step(tmp_path: Path, make_shapes_beton) -> None:
    from profiling.step_profile import profile_step
    from trainer.config import load_config

    beton = make_shapes_beton(tmp_path, train_size=64)
    common = [f"data.train={beton}", "data.batch_size=32", "engine.device=cuda"]
    r = profile_step(load_config("tiny_cpu", [*common, "engine.precision=bf16"]), warmup=2, steps=5)
    assert r["loader"] == "dali-gpu" and r["device"].startswith("cuda")
    _adds_up(r)
    assert r["stages_ms"]["vision_fwd"] > 0 and r["stages_ms"]["backward"] > 0 and 0 < r["mfu"] < 1  # a datasheet peak: never n/a
    cpu_decode = profile_step(load_config("tiny_cpu", [*common, "data.device=cpu"]), warmup=2, steps=3)
    assert cpu_decode["loader"] == "dali-cpu" and cpu_decode["stages_ms"]["h2d"] > 0
    _adds_up(cpu_decode)
    zero2 = profile_step(load_config("tiny_cpu", [*common, "engine.zero_stage=2"]), warmup=2, steps=3)
    _adds_up(zero2)  # overlap_comm's side stream stays out of the tiling
