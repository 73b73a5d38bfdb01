"""The reference (PIL + torchvision) pipeline and `slip profile pipeline` on one small dataset."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.augment_config import AugmentConfig
from pipeline.reader import BetonDataset
from profiling.pil_pipeline import PILDataset, pil_loader
from slip.main import main


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path_factory.mktemp("pbench"), seed=4, train_size=40)


def test_pil_dataset_gives_the_batch_contract(data: Path) -> None:
    ds = BetonDataset(data)
    cfg = AugmentConfig(image_size=32)
    item = PILDataset(ds, ("aug2", "image", "aug1"), cfg)[5]
    assert set(item) == {"image", "aug1", "aug2", "text", "index"}
    for view in ("image", "aug1", "aug2"):
        assert item[view].shape == (3, 32, 32) and item[view].dtype == torch.float32
    assert torch.equal(item["text"], torch.from_numpy(ds.tokens(5)[0].astype(np.int64))) and int(item["index"]) == 5
    batch = next(iter(pil_loader(ds, ("image",), cfg, batch_size=8, workers=0)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["text"].shape == (8, 77)


def test_profile_pipeline_reports_both_sides(data: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    assert main(["profile", "pipeline", "--data", str(data), "--batch-size", "8", "--image-size", "32",
                 "--steps", "2", "--workers", "1", "--source-workers", "1", "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["slipstream"]["samples_per_s"] > 0 and r["baseline"]["samples_per_s"] > 0
    # The ratio is slipstream over the baseline, not the inverse.
    assert r["ratio"] == pytest.approx(r["slipstream"]["samples_per_s"] / r["baseline"]["samples_per_s"])
    assert r["views"] == ["image", "aug1", "aug2"] and r["workers"] == 1 and r["source_workers"] == 1
