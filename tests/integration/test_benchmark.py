"""`slip eval zeroshot --benchmark slip` with known answers: a generated root holding three of SLIP's
suite datasets (eurosat by class-name folders, rendered_sst2 converted by `slip convert classes`,
hateful_memes by numbered folders), one with the wrong number of classes, the rest missing. An oracle
model (features looked up from the data) makes every figure known in advance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation.prompts import fill, readable
from evaluation.suite import suite_classnames, suite_names, suite_templates
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import labelled_images
from pipeline.text import tokenize

AUG = AugmentConfig(image_size=32)
# hateful_memes' class-1 ("hatespeech meme") scores per image, positives then negatives: the margin of
# class 1 over class 0 grows with s, so the AUC is that of these numbers: 2 beats both (2), 1 ties 1
# (1/2) and beats 0.25 (1), 0.5 beats 0.25 (1): 4.5 of 6.
POSITIVE_S, NEGATIVE_S, AUC = [2.0, 1.0, 0.5], [1.0, 0.25], 0.75
OFFSETS = {"eurosat": 0, "rendered_sst2": 10, "hateful_memes": 12}
DIM = 14


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


def _images(folder: Path, n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36 + i, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg", quality=95)


class Oracle(nn.Module):
    """Image and prompt features looked up by content: prompts are one-hot at their dataset's offset
    plus their suite class; images are whatever the test sets."""

    def __init__(self, images: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.images = images
        self.texts = {}
        for dataset, offset in OFFSETS.items():
            for c, name in enumerate(suite_classnames(dataset)):
                synonyms = [name] if isinstance(name, str) else name
                rows = tokenize([fill(t, s) for t in suite_templates(dataset) for s in synonyms]).astype(np.int64)
                self.texts.update({_key(torch.from_numpy(r)): offset + c for r in rows})

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.images[_key(x)] for x in images])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(tokens), DIM)
        out[torch.arange(len(tokens)), torch.tensor([self.texts[_key(t.to(torch.int64))] for t in tokens])] = 1.0
        return out


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    from slip.main import main

    tmp = tmp_path_factory.mktemp("suite")
    root, rng = tmp / "root", np.random.default_rng(17)
    # eurosat: folders named by its class names, which sort otherwise than SLIP's order ("annual crop land", "forest", ...).
    eurosat = suite_classnames("eurosat")
    for name in eurosat:
        _images(root / "eurosat" / name.replace(" ", "_"), 2, rng)
    # rendered_sst2: converted with `slip convert classes` (a labelled dataset, not a folder tree).
    for name in ("negative", "positive"):
        _images(tmp / "sst2" / name, 3, rng)
    assert main(["convert", "classes", "--images", str(tmp / "sst2"), "--out", str(root / "rendered_sst2"), "--max-side", "64", "--workers", "1"]) == 0
    # hateful_memes: folders 0 and 1, SLIP's label order by position.
    _images(root / "hateful_memes" / "0", len(NEGATIVE_S), rng)
    _images(root / "hateful_memes" / "1", len(POSITIVE_S), rng)
    # stl10 with 3 of its 10 classes: that dataset fails, the others still run.
    for name in ("airplane", "bird", "car"):
        _images(root / "stl10" / name, 1, rng)
    (root / "cifar10").mkdir()  # an empty directory is as missing

    features: dict[str, torch.Tensor] = {}
    for dataset in ("eurosat", "rendered_sst2"):  # each image points at its true class's prompts
        data = labelled_images(root / dataset)
        index = {readable(n).casefold(): i for i, n in enumerate(suite_classnames(dataset))}
        for images, labels in data.batches(AUG, batch_size=8):
            for x, y in zip(images, labels):
                f = torch.full((DIM,), 1e-3)
                f[OFFSETS[dataset] + index[readable(data.classes[int(y)]).casefold()]] = 1.0
                features[_key(x)] = f
    scores = {0: list(NEGATIVE_S), 1: list(POSITIVE_S)}
    for images, labels in labelled_images(root / "hateful_memes").batches(AUG, batch_size=8):
        for x, y in zip(images, labels):
            f = torch.zeros(DIM)
            f[OFFSETS["hateful_memes"]], f[OFFSETS["hateful_memes"] + 1] = 1.0, scores[int(y)].pop(0)
            features[_key(x)] = f
    return root, Oracle(features)


def test_the_suite_scores_each_dataset_by_its_own_metric(suite_root: tuple[Path, Oracle]) -> None:
    from evaluation.benchmark import eval_suite

    root, model = suite_root
    r = eval_suite(model, AUG, root, batch_size=4)
    rows = {d["dataset"]: d for d in r["datasets"]}
    assert list(rows) == suite_names() and len(rows) == 28
    assert rows["eurosat"]["status"] == "ok" and rows["eurosat"]["metric"] == "top1" and rows["eurosat"]["value"] == 1.0
    assert rows["eurosat"]["images"] == 20
    assert rows["rendered_sst2"]["value"] == 1.0 and rows["rendered_sst2"]["images"] == 6
    assert rows["hateful_memes"]["metric"] == "roc_auc" and rows["hateful_memes"]["value"] == pytest.approx(AUC)
    assert rows["stl10"]["status"] == "failed" and "3 classes, but SLIP's stl10 has 10" in rows["stl10"]["error"]
    assert rows["cifar10"]["status"] == rows["imagenet"]["status"] == "missing"
    assert r["present"] == 3 and r["failed"] == 1 and r["missing"] == 24
    assert r["mean"] == pytest.approx((1.0 + 1.0 + AUC) / 3)


def test_slip_eval_benchmark_prints_the_table_and_writes_json(suite_root: tuple[Path, Oracle], tmp_path: Path, monkeypatch, capsys) -> None:
    import slip.eval
    from slip.main import main

    root, model = suite_root
    monkeypatch.setattr(slip.eval, "open_model", lambda checkpoint, image_size=None: (model, AUG))
    argv = ["eval", "zeroshot", "--benchmark", "slip", "--root", str(root), "--checkpoint", "oracle", "--device", "cpu", "--batch-size", "4"]
    out = tmp_path / "out" / "suite.json"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hateful_memes" in text and "roc_auc" in text and "75.00%" in text and "missing" in text
    assert "stl10: " in text and f"mean over 3 dataset(s) present: {100 * (2 + AUC) / 3:.2f}%" in text
    written = json.loads(out.read_text())
    assert written["present"] == 3 and written["mean"] == pytest.approx((2 + AUC) / 3)
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["datasets"] == written["datasets"]
    # Option mistakes are one line, before any model is opened.
    assert main(["eval", "zeroshot", "--benchmark", "slip", "--checkpoint", "x"]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert main([*argv, "--templates", "clip80"]) == 2
    assert "drop --data, --classnames and --templates" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--checkpoint", "x"]) == 2
    assert "give --data DIR, or --benchmark slip --root DIR" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--benchmark", "slip", "--root", str(tmp_path / "absent"), "--checkpoint", "x"]) == 2
    assert "absent: no such directory" in capsys.readouterr().err
