"""`slip eval` wiring with known answers: models whose features are constructed to match give
100%, shuffled ones give chance; and a trained run evaluates through the command line."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import demo_dataset as shapes
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import iter_beton, iter_folder
from pipeline.reader import BetonDataset
from pipeline.text import tokenize

AUG = AugmentConfig(image_size=32)


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


class LookupModel(nn.Module):
    """An oracle 'model': images and token rows are looked up in tables built from the data,
    each mapped to a one-hot (or a permuted one-hot) feature."""

    def __init__(self, image_ids: dict[str, int], text_ids: dict[str, int], dim: int, perm: torch.Tensor | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a device to report
        self.image_ids, self.text_ids, self.dim = image_ids, text_ids, dim
        self.perm = perm if perm is not None else torch.arange(dim)

    def _onehot(self, ids: list[int]) -> torch.Tensor:
        out = torch.full((len(ids), self.dim), 1e-3)  # (n, dim); not exactly one-hot: no zero rows
        out[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        return out

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._onehot([self.image_ids[_key(x)] for x in images])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._onehot([int(self.perm[self.text_ids[_key(t.to(torch.int64))]]) for t in tokens])


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = shapes.ShapesSpec(seed=4, train_size=40, zeroshot_per_class=2)
    return shapes.generate(tmp_path_factory.mktemp("eval") / "raw", spec, progress=False)


def _zeroshot_model(raw: Path, perm: torch.Tensor | None = None) -> tuple[LookupModel, list[str], list[str]]:
    from pipeline.eval_view import class_folders

    names = (raw / "classnames.txt").read_text().split("\n")
    names = [n for n in names if n]
    templates = ["a photo of a {}.", "a picture of the {}."]
    image_ids = {}
    for images, labels in iter_folder(raw / "zeroshot", AUG, batch_size=16):
        image_ids.update({_key(x): int(y) for x, y in zip(images, labels)})
    text_ids = {}
    for c, name in enumerate(names):
        for row in tokenize([t.format(name) for t in templates]).astype(np.int64):
            text_ids[_key(torch.from_numpy(row))] = c
    assert len(class_folders(raw / "zeroshot")) == len(names)
    return LookupModel(image_ids, text_ids, len(names), perm), names, templates


def test_zeroshot_is_perfect_for_matched_features_and_near_chance_for_shuffled(raw: Path) -> None:
    from evaluation.zeroshot import eval_zeroshot

    model, names, templates = _zeroshot_model(raw)
    r = eval_zeroshot(model, AUG, raw / "zeroshot", classnames=names, templates=templates, batch_size=16)
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["images"] == 2 * len(names)
    derangement = torch.roll(torch.arange(len(names)), 1)  # every class's prompts point at another class
    model, _, _ = _zeroshot_model(raw, derangement)
    r = eval_zeroshot(model, AUG, raw / "zeroshot", classnames=names, templates=templates, batch_size=16)
    assert r["top1"] == 0.0

    class ImageOnly(nn.Module):  # an encoder without a text tower
        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(1)

    with pytest.raises(ValueError, match="needs a text tower"):
        eval_zeroshot(ImageOnly(), AUG, raw / "zeroshot", classnames=names, templates=templates)
    from trainer.build import model_from_config
    from trainer.config import load_config

    simclr = model_from_config(load_config("tiny_cpu", ["model.objective=simclr"]))
    with pytest.raises(ValueError, match="zero-shot classification needs a text tower"):  # before the missing class names
        eval_zeroshot(simclr, AUG, raw / "zeroshot", templates=templates)


def test_retrieval_is_perfect_for_matched_features_and_chance_for_shuffled(raw: Path, tmp_path: Path) -> None:
    from evaluation.retrieval import eval_retrieval
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    # Distinct images with captions of their own: the oracle below is then exact.
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(src / f"{i:03d}.jpg", quality=95)
        (src / f"{i:03d}.txt").write_text("\n".join(f"photo number {i} in variant {k}" for k in range(1 + i % 3)) + "\n")
    beton = tmp_path / "beton"
    convert(folder.iter_samples(src), beton, source="folder", options=ConvertOptions(max_side=64, workers=1), progress=False)
    dataset = BetonDataset(beton)
    image_ids = {}
    for images, index in iter_beton(dataset, AUG, batch_size=16):
        image_ids.update({_key(x): int(i) for x, i in zip(images, index)})
    assert len(image_ids) == len(dataset)  # every image distinct, so the oracle is well defined
    text_ids = {}
    for i in range(len(dataset)):
        for row in dataset.tokens(i)[: int(dataset.n_captions[i])].astype(np.int64):
            text_ids[_key(torch.from_numpy(row))] = i
    r = eval_retrieval(LookupModel(image_ids, text_ids, len(dataset)), AUG, beton, batch_size=16)
    assert r["images"] == len(dataset) and r["captions"] == int(dataset.n_captions.sum())
    assert r["image_to_text"]["R@1"] == 1.0
    assert r["text_to_image"]["R@10"] == 1.0
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(dataset)))
    shuffled = eval_retrieval(LookupModel(image_ids, text_ids, len(dataset), perm), AUG, beton, batch_size=16)
    assert shuffled["image_to_text"]["R@1"] <= 0.2 and shuffled["text_to_image"]["R@1"] <= 0.2


def test_a_labelled_beton_evaluates_as_its_class_folders(raw: Path, tmp_path: Path, capsys) -> None:
    from evaluation.encoder import ImageTower
    from evaluation.linear_probe import eval_linear
    from evaluation.zeroshot import eval_zeroshot
    from pipeline.eval_view import class_folders, labelled_images
    from slip.main import main

    beton = tmp_path / "labelled"
    argv = ["convert", "classes", "--images", str(raw / "zeroshot"), "--classnames", str(raw / "classnames.txt"),
            "--out", str(beton), "--max-side", "64", "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    names = [n for n in (raw / "classnames.txt").read_text().split("\n") if n]
    data = labelled_images(beton)
    assert data.is_beton and data.classes == class_folders(raw / "zeroshot") and data.classnames == names
    folder_labels = torch.cat([y for _, y in iter_folder(raw / "zeroshot", AUG, batch_size=16)])
    beton_batches = list(data.batches(AUG, batch_size=16))
    assert torch.equal(torch.cat([y for _, y in beton_batches]), folder_labels)  # the same images, in the same order
    # The oracle, keyed on the .beton's own (re-encoded) pixels; the class names come from the manifest.
    image_ids = {_key(x): int(y) for images, labels in beton_batches for x, y in zip(images, labels)}
    templates = ["a photo of a {}."]
    text_ids = {_key(torch.from_numpy(row)): c for c, n in enumerate(names) for row in tokenize([templates[0].format(n)]).astype(np.int64)}
    r = eval_zeroshot(LookupModel(image_ids, text_ids, len(names)), AUG, beton, templates=templates, batch_size=16)
    assert r["top1"] == 1.0 and r["images"] == len(folder_labels)
    deranged = LookupModel(image_ids, text_ids, len(names), torch.roll(torch.arange(len(names)), 1))
    assert eval_zeroshot(deranged, AUG, beton, templates=templates, batch_size=16)["top1"] == 0.0

    more = shapes.generate(tmp_path / "more", shapes.ShapesSpec(seed=9, train_size=1, zeroshot_per_class=5), progress=False)
    train_ids = {_key(x): int(y) for images, labels in iter_folder(more / "zeroshot", AUG, batch_size=16) for x, y in zip(images, labels)}

    class LabelTower(nn.Module):  # a frozen image tower that knows each image's class: the probe must then be perfect
        def __init__(self) -> None:
            super().__init__()
            self.lookup = LookupModel({**train_ids, **image_ids}, {}, len(names))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.lookup.encode_image(images)

    probe = eval_linear(ImageTower(LabelTower()), AUG, more / "zeroshot", beton, batch_size=16)  # a folder, then a .beton
    assert probe["n_train"] == 5 * len(names) and probe["n_val"] == len(folder_labels)
    assert probe["top1"] == 1.0  # the .beton's labels reach the probe aligned with its images
    # A dataset without labels is one line naming it.
    unlabelled = tmp_path / "unlabelled"
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / "a.jpg")
    (src / "a.txt").write_text("a caption\n")
    convert(folder.iter_samples(src), unlabelled, source="folder", options=ConvertOptions(max_side=64, workers=1), progress=False)
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "x.safetensors"), "--data", str(unlabelled)]) == 2
    with pytest.raises(ValueError, match="has no labels"):
        labelled_images(unlabelled)


@pytest.mark.slow
def test_a_trained_run_evaluates_from_the_command_line(raw: Path, tmp_path: Path, make_shapes_beton, capsys) -> None:
    from slip.main import main

    beton = make_shapes_beton(tmp_path / "data", train_size=32)
    overrides = [f"data.train={beton}", f"run.out={tmp_path}", "run.name=t", "schedule.steps=2", "data.batch_size=16",
                 "run.tensorboard=false"]  # fmt: skip
    assert main(["train", "--config", "tiny_cpu", *overrides]) == 0
    run = tmp_path / "t"
    capsys.readouterr()
    zs = ["eval", "zeroshot", "--checkpoint", str(run), "--data", str(raw / "zeroshot"), "--json",
          "--classnames", str(raw / "classnames.txt"), "--templates", str(raw / "templates.txt")]  # fmt: skip
    assert main(zs) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["top1"] <= r["top5"] <= 1 and r["classes"] == len(shapes.COLOURS) * len(shapes.SHAPES)
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(beton), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["image_to_text"]["R@1"] <= r["image_to_text"]["R@5"] <= 1
    probe = shapes.generate(tmp_path / "probe", shapes.ShapesSpec(seed=9, train_size=1, zeroshot_per_class=5), progress=False)
    assert main(["eval", "linear", "--checkpoint", str(run), "--train", str(probe / "zeroshot"), "--val", str(raw / "zeroshot"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["top1"] <= 1 and r["protocol"] == "lbfgs"
    sgd = ["--protocol", "sgd", "--epochs", "2", "--sgd-batch", "32", "--lr", "0.5"]
    assert main(["eval", "linear", "--checkpoint", str(run), "--train", str(probe / "zeroshot"), "--val", str(raw / "zeroshot"), *sgd, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["protocol"] == "sgd" and 0 <= r["top1"] <= r["top5"] <= 1 and len(r["train_loss"]) == 2
    assert (r["epochs"], r["batch_size"], r["lr"], r["world_size"]) == (2, 32, 0.5 * 32 / 256, 1)
    # Another evaluation size than the training one is refused in one line (the position embedding is fixed).
    capsys.readouterr()
    assert main([*zs, "--image-size", "72"]) == 2
    assert "trained at 64 px" in capsys.readouterr().err
    # A checkpoint that is not there is one line and exit 2.
    assert main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "absent.safetensors"), "--data", str(raw / "zeroshot")]) == 2


def test_evaluation_during_training_is_logged_with_the_step(raw: Path, tmp_path: Path, make_shapes_beton) -> None:
    from trainer.config import load_config
    from trainer.loop import train

    beton = make_shapes_beton(tmp_path / "data", train_size=32)  # 2 steps per epoch at batch 16
    overrides = [f"data.train={beton}", f"run.out={tmp_path}", "run.name=e", "schedule.steps=5", "data.batch_size=16",
                 "run.tensorboard=false", "run.log_every=100", "eval.every_epochs=1", f"eval.zeroshot={raw / 'zeroshot'}",
                 "eval.batch_size=16"]  # fmt: skip
    train(load_config("tiny_cpu", overrides), progress=False)
    records = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "zeroshot_top1" in r]
    assert evaluated == [1, 3, 4]  # after every 2 steps (one epoch) and at the end
    assert all(0 <= r["zeroshot_top1"] <= r["zeroshot_top5"] <= 1 for r in records if "zeroshot_top1" in r)
    assert all(r["zeroshot_skipped"] == 0 for r in records if "zeroshot_top1" in r)  # logged beside the figures
    with pytest.raises(ValueError, match="nothing to evaluate"):
        train(load_config("tiny_cpu", [*overrides[:-2], "eval.zeroshot=", "run.name=f"]), progress=False)
    # Under ZeRO-3 rank 0 evaluates a gathered copy; the training losses are those of a run without evaluation.
    train(load_config("tiny_cpu", [*overrides, "run.name=z3", "engine.zero_stage=3"]), progress=False)
    train(load_config("tiny_cpu", [*overrides[:-3], "eval.every_epochs=0", "run.name=z3plain", "engine.zero_stage=3"]), progress=False)
    z3 = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "z3plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in z3 if "zeroshot_top1" in r] == [1, 3, 4]
    assert [r["loss"] for r in z3 if "loss" in r] == [r["loss"] for r in plain if "loss" in r]
    # Class names that do not fit the data fail before the first step, not epochs into the run.
    names = tmp_path / "names.txt"
    names.write_text("just\ntwo\n")
    with pytest.raises(ValueError, match="24 classes but 2 class names"):
        train(load_config("tiny_cpu", [*overrides, "run.name=g", f"eval.classnames={names}"]), progress=False)
    assert not (tmp_path / "g").exists()


def test_a_template_may_hold_other_braces() -> None:
    from evaluation.zeroshot import class_embeddings

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            self.seen.append(tokens)
            return torch.randn(len(tokens), 8)

    model = Recorder()
    class_embeddings(model, ["cat", "dog"], ["a {} of {c}", "{}"], torch.device("cpu"))
    want = tokenize(["a cat of {c}", "cat", "a dog of {c}", "dog"]).astype(np.int64)
    assert torch.equal(torch.cat(model.seen), torch.from_numpy(want))


def test_eval_command_line_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from slip.main import main

    base = ["eval", "zeroshot", "--checkpoint", str(tmp_path / "x.safetensors"), "--data", str(tmp_path)]
    assert main([*base, "--batch-size", "0"]) == 2
    assert "--batch-size and --threads must be positive" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    # Each linear protocol refuses the other's options before any model is read.
    linear = ["eval", "linear", "--checkpoint", str(tmp_path / "x.safetensors"), "--train", str(tmp_path), "--val", str(tmp_path)]
    assert main([*linear, "--epochs", "3", "--lr", "0.2"]) == 2
    assert "--epochs, --lr: only with --protocol sgd" in capsys.readouterr().err
    assert main([*linear, "--protocol", "sgd", "--l2", "1e-3"]) == 2
    assert "--l2: only with --protocol lbfgs" in capsys.readouterr().err
    assert main([*linear, "--protocol", "sgd", "--epochs", "0"]) == 2
    assert "--epochs and the probe's batch must be positive" in capsys.readouterr().err


def test_only_the_sgd_probe_runs_over_several_processes(tmp_path: Path, capsys, monkeypatch) -> None:
    from slip.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "x.safetensors"), "--data", str(tmp_path)]) == 2
    assert "only `slip eval linear --protocol sgd` runs over several" in capsys.readouterr().err
