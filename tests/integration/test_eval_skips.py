"""Evaluation on data with bad images in it: each is skipped and counted by reason, never replaced,
and what is left is measured exactly as the same data without them (the oracle)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import Skipped, iter_beton, iter_folder
from pipeline.reader import BetonDataset
from pipeline.text import tokenize

AUG = AugmentConfig(image_size=32)
CLASSES = ("cat", "coffee_mug", "golden_retriever")
REPO = Path(__file__).resolve().parents[2]


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bogus_huffman_table(data: bytes) -> bytes:
    """Structurally sound, but DALI's decoder rejects it: the backstop must find it."""
    out = bytearray(data)
    dht = out.index(b"\xff\xc4")
    out[dht + 5 : dht + 21] = b"\xff" * 16  # code counts far past what the table holds
    return bytes(out)


def _trees(root: Path) -> tuple[Path, Path, dict[str, int]]:
    """A clean tree and the same tree with bad files added; the bad files' reasons, counted."""
    rng = np.random.default_rng(11)
    clean, dirty = root / "clean", root / "dirty"
    for c in CLASSES:
        (clean / c).mkdir(parents=True)
        for i in range(4):
            (clean / c / f"{i}.jpg").write_bytes(_jpeg(rng))
    shutil.copytree(clean, dirty)
    good = _jpeg(rng)
    (dirty / "cat" / "0a_notes.jpg").write_text("not a picture at all\n" * 20)
    (dirty / "cat" / "1a_truncated.jpg").write_bytes(good[: len(good) // 2])
    (dirty / "coffee_mug" / "2a_empty.jpg").write_bytes(b"")
    (dirty / "coffee_mug" / "noise.png").write_bytes(rng.bytes(3000))
    (dirty / "golden_retriever" / "1a_huffman.jpg").write_bytes(_bogus_huffman_table(good))
    (dirty / "golden_retriever" / "locked.jpg").write_bytes(good)  # refused by the monkeypatched read below
    reasons = {"not_an_image": 2, "truncated": 1, "empty_file": 1, "undecodable": 1, "unreadable_file": 1}
    return clean, dirty, reasons


def _lock(monkeypatch) -> None:
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


class Lookup(nn.Module):
    """An oracle encoder: images and token rows looked up in tables of one-hot features."""

    def __init__(self, images: dict[str, int], texts: dict[str, int], dim: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.images, self.texts, self.dim = images, texts, dim

    def _onehot(self, ids: list[int]) -> torch.Tensor:
        out = torch.full((len(ids), self.dim), 1e-3)
        out[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        return out

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._onehot([self.images[_key(x)] for x in images])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._onehot([self.texts[_key(t.to(torch.int64))] for t in tokens])

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # as an image tower for the linear probe
        return self.encode_image(images)


def test_folder_evaluations_skip_bad_files_and_keep_labels_true(tmp_path: Path, monkeypatch) -> None:
    from evaluation.encoder import ImageTower
    from evaluation.linear_probe import eval_linear
    from evaluation.zeroshot import eval_zeroshot

    clean, dirty, reasons = _trees(tmp_path)
    _lock(monkeypatch)
    ref = [(x, y) for x, y in iter_folder(clean, AUG, batch_size=5)]
    skipped = Skipped()
    got = [(x, y) for x, y in iter_folder(dirty, AUG, batch_size=5, skipped=skipped)]
    assert skipped.by_reason == reasons and len(skipped.first) == 5
    assert skipped.first[0].endswith("cat/0a_notes.jpg: not_an_image")
    # The same images with the same labels, in the same order: nothing was substituted.
    assert torch.equal(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in ref]))
    assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in ref]))

    images = {_key(x): int(y) for xs, ys in ref for x, y in zip(xs, ys)}
    names = [c.replace("_", " ") for c in CLASSES]  # the folder names are the class names
    template = "a photo of a {}."
    texts = {_key(torch.from_numpy(row)): c for c, n in enumerate(names) for row in tokenize([template.format(n)]).astype(np.int64)}
    model = Lookup(images, texts, len(CLASSES))
    r = eval_zeroshot(model, AUG, dirty, templates=[template], batch_size=5)
    assert (r["top1"], r["images"], r["skipped"]) == (1.0, 12, dict(sorted(reasons.items())))
    probe = eval_linear(ImageTower(model), AUG, dirty, dirty, batch_size=5, l2_grid=[1e-3])
    assert (probe["top1"], probe["n_train"], probe["n_val"]) == (1.0, 12, 12)
    assert probe["skipped"] == {k: 2 * v for k, v in sorted(reasons.items())}


def test_a_tree_of_nothing_but_bad_files_is_one_line(tmp_path: Path) -> None:
    from evaluation.zeroshot import eval_zeroshot

    for c in CLASSES:
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.jpg").write_bytes(b"")
    texts = {_key(torch.from_numpy(row)): c for c, row in enumerate(tokenize([c.replace("_", " ") for c in CLASSES]).astype(np.int64))}
    model = Lookup({}, texts, len(CLASSES))
    with pytest.raises(ValueError, match=r"no image could be decoded \(empty_file=3\)"):
        eval_zeroshot(model, AUG, tmp_path, templates=["{}"], batch_size=4)


def test_retrieval_drops_a_clobbered_sample_with_its_captions(tmp_path: Path) -> None:
    from evaluation.retrieval import eval_retrieval
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):
        (src / f"{i:03d}.jpg").write_bytes(_jpeg(rng))
        (src / f"{i:03d}.txt").write_text("\n".join(f"picture {i} variant {k}" for k in range(1 + i % 3)) + "\n")
    beton = tmp_path / "beton"
    convert(folder.iter_samples(src), beton, source="folder", options=ConvertOptions(max_side=64, workers=1), progress=False)
    dataset = BetonDataset(beton)
    images = {_key(x): int(i) for xs, idx in iter_beton(dataset, AUG, batch_size=5) for x, i in zip(xs, idx)}
    texts = {_key(torch.from_numpy(row)): i for i in range(len(dataset)) for row in dataset.tokens(i)[: int(dataset.n_captions[i])].astype(np.int64)}
    shard, i = dataset._locate(5)
    with open(shard.path, "r+b") as f:  # the start marker overwritten, as a bad copy would
        f.seek(int(shard.image_ptr[i]))
        f.write(b"\0\0\0\0")
    dataset = BetonDataset(beton)
    skipped = Skipped()
    assert [int(i) for _, idx in iter_beton(dataset, AUG, batch_size=5, skipped=skipped) for i in idx] == [k for k in range(12) if k != 5]
    assert skipped.by_reason == {"not_jpeg": 1}
    r = eval_retrieval(Lookup(images, texts, len(dataset)), AUG, beton, batch_size=5)
    assert r["images"] == 11 and r["captions"] == int(dataset.n_captions.sum()) - int(dataset.n_captions[5])
    assert r["image_to_text"]["R@1"] == 1.0 and r["text_to_image"]["R@1"] == 1.0  # every kept caption still finds its own image
    assert r["skipped"] == {"not_jpeg": 1} and "sample 5" in r["skipped_first"][0]


@pytest.mark.slow
def test_slip_eval_on_a_tree_with_bad_files_exits_0_and_counts_them(tmp_path: Path) -> None:
    from trainer.build import model_from_config
    from trainer.config import load_config
    from trainer.weights import write_weights

    _, dirty, reasons = _trees(tmp_path)
    (dirty / "golden_retriever" / "locked.jpg").unlink()  # a subprocess cannot be monkeypatched
    del reasons["unreadable_file"]
    cfg = load_config("tiny_cpu", [])
    model = tmp_path / "tiny.safetensors"
    write_weights(model_from_config(cfg).state_dict(), model, cfg.to_dict())
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    env.pop("SLIP_DEBUG", None)
    common = ["--checkpoint", str(model), "--batch-size", "4", "--json"]
    for args, factor in ((["zeroshot", "--data", str(dirty)], 1), (["linear", "--train", str(dirty), "--val", str(dirty), "--l2", "1e-2"], 2)):
        proc = subprocess.run([sys.executable, "-m", "slip", "eval", *args, *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["skipped"] == {k: factor * v for k, v in sorted(reasons.items())}
    text = subprocess.run([sys.executable, "-m", "slip", "eval", "zeroshot", "--data", str(dirty), *common[:-1]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600).stdout  # fmt: skip
    assert "skipped 5 image(s) that cannot be decoded (empty_file=1, not_an_image=2, truncated=1, undecodable=1)" in text
