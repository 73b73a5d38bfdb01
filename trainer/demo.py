"""`slip demo`: generate the embedded dataset, convert it, train a tiny SLIP, evaluate zero-shot."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline import shapes
from pipeline.atomic import write_json_atomic
from pipeline.convert import ConvertOptions, convert
from pipeline.schema import MANIFEST
from pipeline.sources import folder
from trainer.config import Config, load_config
from trainer.loop import init_model, train
from trainer.objectives import get_objective
from trainer.zeroshot import read_lines, zeroshot_accuracy


def prepare_shapes(root: Path, spec: shapes.ShapesSpec, progress: bool = True) -> tuple[Path, Path]:
    """The embedded dataset, generated and converted on first use; (train .beton dir, zero-shot dir)."""
    raw = shapes.generate(root / "shapes", spec, progress=progress)
    digest = hashlib.sha256((raw / "spec.json").read_bytes()).hexdigest()[:12]
    converted = root / f"shapes-train-{digest}"  # a new spec never reuses another spec's shards
    manifest = converted / MANIFEST
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        options = ConvertOptions(max_side=spec.image_size, captions_per_image=spec.captions_per_image, workers=os.cpu_count() or 1)
        samples = folder.iter_samples(raw / "train")
        convert(samples, converted, source="folder", options=options, resume=manifest.exists(), progress=progress)
    return converted, raw


def run_demo(cfg: Config, spec: shapes.ShapesSpec = shapes.ShapesSpec(), *, progress: bool = True) -> dict[str, Any]:
    if not get_objective(cfg.model.objective).text:
        raise ValueError(f"config: the demo measures zero-shot accuracy, which model.objective={cfg.model.objective} cannot give")
    train_dir, raw = prepare_shapes(Path(cfg.data.root), spec, progress)
    cfg = replace(cfg, data=replace(cfg.data, train=str(train_dir), zeroshot=str(raw / "zeroshot")))
    classnames = read_lines(raw / "classnames.txt")
    templates = read_lines(raw / "templates.txt")

    def evaluate(model) -> float:
        return zeroshot_accuracy(model, cfg.data.zeroshot, classnames, templates, cfg.augment, threads=cfg.data.threads)["top1"]

    untrained = evaluate(init_model(cfg))
    # The demo is a fresh run every time, not a resume of the last one.
    shutil.rmtree(cfg.run_dir / "checkpoints", ignore_errors=True)
    result = train(cfg, progress=progress)
    trained = evaluate(result.model)
    results = {
        "zeroshot_top1_untrained": untrained,
        "zeroshot_top1_trained": trained,
        "chance": 1 / len(classnames),
        "steps": result.steps,
        "objective": cfg.model.objective,
        "model": cfg.model.size,
        "dataset": asdict(spec),
        "final_loss": result.last.get("loss"),
    }
    write_json_atomic(result.run_dir / "results.json", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = [
        ("untrained model", results["zeroshot_top1_untrained"]),
        (f"trained {results['objective'].upper()} ({results['steps']} steps)", results["zeroshot_top1_trained"]),
        ("chance", results["chance"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'zero-shot top-1 on the held-out shapes split':<{width}}", "-" * (width + 10)]
    lines += [f"{name:<{width}}  {100 * value:6.1f}%" for name, value in rows]
    return "\n".join(lines)


def demo_config(out: Path, overrides: list[str]) -> Config:
    return load_config("tiny_cpu", [f"run.out={out.parent}", f"run.name={out.name}", *overrides])
