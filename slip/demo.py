"""`slip demo`: generate the demo dataset, convert it, train a tiny SLIP, evaluate zero-shot.

The libraries are imported when the demo runs: they bring torch, FFCV, DALI and timm, seconds
that `slip --help` should not wait for.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.demo_dataset import ShapesSpec
    from trainer.config import Config


def prepare_shapes(root: Path, spec: ShapesSpec, progress: bool = True) -> tuple[Path, Path]:
    """The demo dataset, generated and converted on first use; (train .beton dir, raw dataset dir)."""
    from pipeline import demo_dataset as shapes
    from pipeline.convert import ConvertOptions, convert
    from pipeline.schema import MANIFEST
    from pipeline.sources import folder

    raw = shapes.generate(root / "shapes", spec, progress=progress)
    digest = hashlib.sha256((raw / "spec.json").read_bytes()).hexdigest()[:12]
    converted = root / f"shapes-train-{digest}"  # a new spec never reuses another spec's shards
    manifest = converted / MANIFEST
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        options = ConvertOptions(max_side=spec.image_size, captions_per_image=spec.captions_per_image, workers=os.cpu_count() or 1)
        samples = folder.iter_samples(raw / "train")
        convert(samples, converted, source="folder", options=options, resume=manifest.exists(), progress=progress)
    return converted, raw


def run_demo(cfg: Config, spec: ShapesSpec | None = None, *, progress: bool = True) -> dict[str, Any]:
    from evaluation.prompts import read_lines
    from evaluation.zeroshot import eval_zeroshot
    from pipeline.atomic import write_json_atomic
    from pipeline.demo_dataset import ShapesSpec
    from trainer.build import init_model
    from trainer.loop import train
    from trainer.objectives import get_objective

    spec = spec or ShapesSpec()
    if not get_objective(cfg.model.objective).text:
        raise ValueError(f"config: the demo measures zero-shot accuracy, which model.objective={cfg.model.objective} cannot give")
    train_dir, raw = prepare_shapes(Path(cfg.data.root), spec, progress)
    cfg = replace(cfg, data=replace(cfg.data, train=str(train_dir)), eval=replace(cfg.eval, zeroshot=str(raw / "zeroshot")))
    classnames = read_lines(raw / "classnames.txt")
    templates = read_lines(raw / "templates.txt")

    def evaluate(model) -> float:
        return eval_zeroshot(model, cfg.augment, cfg.eval.zeroshot, classnames=classnames, templates=templates, threads=cfg.data.threads)["top1"]

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
    from trainer.config import load_config

    return load_config("tiny_cpu", [f"run.out={out.parent}", f"run.name={out.name}", *overrides])


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = demo_config(Path(args.out), args.overrides)
    results = run_demo(cfg)
    print(format_table(results))
    print(f"results: {cfg.run_dir / 'results.json'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="generate, convert, train and evaluate a tiny SLIP on the CPU")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
    demo.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    demo.set_defaults(func=_cmd_demo)
