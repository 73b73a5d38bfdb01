"""`slip profile convert|pipeline|loss|step|all`: where throughput goes, each beside a baseline."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from slip.output import emit, percent, stdout_to_stderr, table
from slip.train import add_recipe_arguments


def _cmd_convert(args: argparse.Namespace) -> int:
    from profiling.convert_bench import compare, synthetic_images

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    scratch = None
    if args.images:
        images = Path(args.images)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="slip-bench-images-"))
        images = synthetic_images(scratch / "images", args.synthetic)
    try:
        r = compare(images, workers, max_side=args.max_side, quality=args.quality, shard_size=args.shard_size)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"{r['images']} images, max side {r['max_side']}, quality {r['quality']}, shards of {r['shard_size']}, {r['cores']} cores",
             f"  baseline (PIL, one process)  {r['baseline']['images_per_s']:8.1f} images/s"]  # fmt: skip
    for w in workers:
        v = r[f"slipstream_workers_{w}"]
        lines.append(f"  slip convert, {w} worker(s)    {v['images_per_s']:8.1f} images/s  {v['ratio']:.2f}x")
    emit(r, "\n".join(lines), args.json)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from profiling.pipeline_bench import compare_pipelines

    r = compare_pipelines(
        args.data, device=args.device, batch_size=args.batch_size, image_size=args.image_size,
        workers=args.workers, source_workers=args.source_workers, steps=args.steps,
    )  # fmt: skip
    emit(r, lambda: "\n".join([
        f"{args.data}: batches of {r['batch_size']} x 3 views of {r['image_size']} px, {r['workers']} workers, "
        f"{r['source_workers']} source workers, {r['device']}",
        f"  baseline (PIL + torchvision, DataLoader)  {r['baseline']['samples_per_s']:8.1f} samples/s",
        f"  slipstream (DALI {r['device']})             {r['slipstream']['samples_per_s']:8.1f} samples/s  {r['ratio']:.2f}x",
    ]), args.json)  # fmt: skip
    return 0


def _loss_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"SLIP loss forward + backward: batch {r['batch']}, dim {r['dim']} (SimCLR {r['ssl_dim']}), {r['dtype']} on {r['device']}"]
    for name, v in r["backends"].items():
        if "error" in v:
            lines.append(f"  {name:10s} failed: {v['error']}")
            continue
        ratios = f"  {v['time_ratio']:.2f}x time, {v['memory_ratio']:.3f}x memory" if "time_ratio" in v else ""
        lines.append(f"  {name:10s} {v['seconds']:8.2f} s  {v['extra_peak_bytes'] / 2**20:9.0f} MiB extra peak{ratios}")
    return lines


def _fit_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"largest batch whose SLIP loss forward + backward fits in {r['budget_gib']:g} GiB: dim {r['dim']} (SimCLR {r['ssl_dim']}), {r['dtype']} on {r['device']}"]
    for name, v in r["backends"].items():
        lines.append(f"  {name:10s} " + (f"failed: {v['error']}" if "error" in v else f"{v['largest_batch']:8d}  ({len(v['probes'])} probes)"))
    return lines


def _cmd_loss(args: argparse.Namespace) -> int:
    from profiling.loss_bench import fit_batches, profile_loss

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if args.fit is not None:
        if args.fit <= 0:
            raise ValueError(f"--fit is a memory budget in GiB, got {args.fit}")
        r = fit_batches(args.dim, backends, device=args.device, dtype=args.dtype, budget_gib=args.fit, start=args.batch)
        emit(r, lambda: "\n".join(_fit_lines(r)), args.json)
        return 0 if all("error" not in v for v in r["backends"].values()) else 1
    r = profile_loss(args.batch, args.dim, backends, device=args.device, dtype=args.dtype, repeats=args.repeats)
    emit(r, lambda: "\n".join(_loss_lines(r)), args.json)
    return 0 if all("error" not in v for v in r["backends"].values()) else 1


def _overrides(args: argparse.Namespace) -> list[str]:
    """The recipe's overrides, `--data` first (an explicit data.train=... after it wins)."""
    return [*([f"data.train={args.data}"] if args.data else []), *args.overrides]


def _step_report(args: argparse.Namespace) -> dict:
    from profiling.step_profile import compare_steps

    if args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--warmup must be 0 or more and --steps at least 1, got {args.warmup} and {args.steps}")
    if args.png and not Path(args.png).resolve().parent.is_dir():
        raise FileNotFoundError(f"{Path(args.png).parent}: no such directory for --png")
    variants = [v.split() for v in args.compare] if args.compare else [[]]
    # Under a multi-rank launcher every rank must run the same configurations together, in its own process.
    same_process = args.same_process or int(os.environ.get("WORLD_SIZE", "1")) > 1
    with stdout_to_stderr():
        return compare_steps(args.config, _overrides(args), variants, warmup=args.warmup, steps=args.steps, fresh_processes=not same_process,
                             plain_baseline=args.plain_baseline)  # fmt: skip


def step_table(report: dict[str, Any]) -> str:
    """The comparison as a terminal table: stages as rows, configurations as columns."""
    configs = report["configs"]
    width = max(16, *(len(c["name"]) + 2 for c in configs))
    lines = [f"slip profile step: {report['recipe']} {' '.join(report['overrides'])}".rstrip()]
    rows = [["", *(c["name"] for c in configs)]]

    def row(label: str, cell) -> None:
        rows.append([label, *(cell(c) if "error" not in c else "-" for c in configs)])

    ok = [c for c in configs if "error" not in c]
    if ok:
        c0 = ok[0]
        lines[0] += f"  [{c0['device']}, {c0['world']} rank(s), batch {c0['batch_size']}, median of {c0['steps']} steps after {c0['warmup']} warm-up]"
    for stage in report["stages"]:
        row(stage, lambda c, s=stage: f"{c['stages_ms'][s]:.1f} ms {100 * c['stages_ms'][s] / c['step_ms']:3.0f}%")
    row("step (median)", lambda c: f"{c['step_ms']:.1f} ms")
    row("step (wall, mean)", lambda c: f"{c['wall_ms']:.1f} ms")
    row("comm behind backward", lambda c: f"{c['overlapped_comm_ms']:.1f} ms")
    row("samples/s", lambda c: f"{c['samples_per_s']:.1f}" + (f" {c['throughput_ratio']:.2f}x" if "throughput_ratio" in c else ""))
    row("data stall", lambda c: percent(c["data_stall"]))
    row("peak memory", lambda c: f"{c['peak_memory_bytes'] / 2**30:.2f} GiB")
    row("MFU", lambda c: "n/a" if c["mfu"] is None else percent(c["mfu"]))
    row("loader: read", lambda c: f"{c['loader_alone']['read_ms']:.1f} ms")
    row("loader: decode+aug", lambda c: f"{c['loader_alone']['decode_augment_ms']:.1f} ms")
    row("loader", lambda c: c["loader"])
    lines += table(rows, label_width=22, cell_width=width)
    for c in ok[:1]:
        lines.append(f"MFU: {c['train_flops_per_step'] / 1e9:.1f} GFLOP per step (analytic: 3x the forward of both towers, text at "
                     f"its full context; recompute by GradCache or checkpointing not counted), against "
                     f"{c['peak_flops'] / 1e12:.3g} TFLOP/s per device ({c['peak_source']})")  # fmt: skip
    lines += [f"MFU of {c['name']}: {c['mfu_note']}" for c in ok if c["mfu"] is None]
    lines.append("loader: per batch, running alone (throughput); prefetching hides it behind the step, data_wait is what it could not hide")
    lines += [f"{c['name']}: failed: {c['error']}" for c in configs if "error" in c]
    return "\n".join(lines)


def _write_step_chart(report: dict, path: str) -> None:
    from profiling.chart import stage_chart

    bars = [(c["name"], c["stages_ms"]) for c in report["configs"] if "error" not in c]
    if bars:
        title = f"slip profile step: {report['recipe']}, median of each stage, ms"
        print(f"chart: {stage_chart(bars, path, title=title)}", file=sys.stderr)


def _cmd_step(args: argparse.Namespace) -> int:
    report = _step_report(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    emit(report, lambda: step_table(report), args.json)
    if args.png:
        _write_step_chart(report, args.png)
    return 0 if all("error" not in c for c in report["configs"]) else 1


def _cmd_all(args: argparse.Namespace) -> int:
    """Pipeline, loss and step for one recipe: the three places a step's time can go."""
    from profiling.loss_bench import profile_loss
    from profiling.pipeline_bench import compare_pipelines
    from profiling.step_profile import PROFILE_DATA_HINT
    from trainer.config import load_config, require_train_data
    from trainer.dist import pick_device
    from trainer.objectives import get_objective

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("slip profile all runs in one process; under a launcher use `slip profile step`")
    cfg = load_config(args.config, _overrides(args))
    if cfg.data.loader == "synthetic":
        raise ValueError("slip profile all measures the input pipeline too, which data.loader=synthetic has none of: use `slip profile step`")
    require_train_data(cfg, PROFILE_DATA_HINT)
    device = pick_device(cfg.engine.device)
    views = get_objective(cfg.model.objective).views
    backends = list(dict.fromkeys(["reference", cfg.loss.backend]))
    dtype = "bfloat16" if cfg.engine.precision == "bf16" else "float32"
    with stdout_to_stderr():
        pipeline = compare_pipelines(
            cfg.data.train, device="gpu" if device == "cuda" else "cpu", batch_size=cfg.data.batch_size,
            image_size=cfg.augment.image_size, views=views, workers=cfg.data.threads, steps=args.steps,
        )  # fmt: skip
        loss = profile_loss(cfg.data.batch_size, cfg.model.embed_dim, backends, device=device, dtype=dtype, repeats=3)
    step = _step_report(args)

    def text() -> str:
        p = pipeline
        lines = [f"pipeline: {p['slipstream']['samples_per_s']:.1f} samples/s (DALI {p['device']}) vs "
                 f"{p['baseline']['samples_per_s']:.1f} (PIL + torchvision): {p['ratio']:.2f}x; batch {p['batch_size']}, {p['image_size']} px"]  # fmt: skip
        for name, v in loss["backends"].items():
            extra = f", {v['time_ratio']:.2f}x time" if "time_ratio" in v else ""
            lines.append(f"loss {name}: " + (f"failed: {v['error']}" if "error" in v else f"{1e3 * v['seconds']:.1f} ms forward+backward{extra}, "
                                             f"{v['extra_peak_bytes'] / 2**20:.0f} MiB extra"))  # fmt: skip
        return "\n".join([*lines, step_table(step)])

    emit({"pipeline": pipeline, "loss": loss, "step": step}, text, args.json)
    if args.png:
        _write_step_chart(step, args.png)
    return 0 if all("error" not in c for c in step["configs"]) else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="measure throughput, side by side with a baseline")
    targets = prof.add_subparsers(dest="target", required=True)
    pconv = targets.add_parser("convert", help="slip convert against a plain single-process PIL loop")
    pconv.add_argument("--images", help="folder of JPEGs with sidecar captions (default: --synthetic of them)")
    pconv.add_argument("--synthetic", type=int, default=1000, metavar="N", help="generate N 400-640 px JPEGs when no --images (default: %(default)s)")
    pconv.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated (default: %(default)s)")
    pconv.add_argument("--max-side", type=int, default=384, metavar="PX",
                       help="longest image side after resizing, as `slip convert --max-side` (default: %(default)s)")  # fmt: skip
    pconv.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality (1-100) of re-encoded images (default: %(default)s)")
    pconv.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    pconv.set_defaults(func=_cmd_convert)

    ppipe = targets.add_parser("pipeline", help="the DALI three-view loader against the SLIP reference's PIL + torchvision pipeline")
    ppipe.add_argument("--data", required=True, help="directory written by `slip convert`")
    ppipe.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                       help="where DALI decodes and augments: cpu, or gpu (nvJPEG decode on the GPU) (default: %(default)s)")  # fmt: skip
    ppipe.add_argument("--batch-size", type=int, default=64, help="samples per batch, for both pipelines (default: %(default)s)")
    ppipe.add_argument("--image-size", type=int, default=224, metavar="PX", help="side of each augmented view, in pixels (default: %(default)s)")
    ppipe.add_argument("--workers", type=int, default=0, help="CPU threads/workers for both (default: every core)")
    ppipe.add_argument("--source-workers", type=int, default=0, help="processes reading JPEG bytes for DALI (default: %(default)s)")
    ppipe.add_argument("--steps", type=int, default=10, help="measured batches, after 3 warm-up ones (default: %(default)s)")
    ppipe.set_defaults(func=_cmd_pipeline)

    ploss = targets.add_parser("loss", help="contrastive loss backends: time and peak memory of forward + backward")
    ploss.add_argument("--batch", type=int, required=True, help="global batch B (one process holds all of it)")
    ploss.add_argument("--dim", type=int, default=512, help="CLIP embedding width; SimCLR's is 256 (default: %(default)s)")
    ploss.add_argument("--backend", default="reference,chunked",
                       help="backends, comma-separated; ratios are against the first (default: %(default)s)")  # fmt: skip
    ploss.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ploss.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype of the embeddings and of the loss computation (default: %(default)s)")  # fmt: skip
    ploss.add_argument("--repeats", type=int, default=1, help="runs per backend; the fastest is reported (default: %(default)s)")
    ploss.add_argument("--fit", type=float, metavar="GIB",
                       help="instead of timing: the largest batch (bisection from --batch) each backend fits in GIB of GPU memory (CUDA only)")  # fmt: skip
    ploss.set_defaults(func=_cmd_loss)

    for name, helptext, func in (
        ("step", "the real training step, stage by stage: times, samples/s, data stall, memory, MFU", _cmd_step),
        ("all", "pipeline, loss and step of one recipe", _cmd_all),
    ):
        p = targets.add_parser(name, help=helptext)
        add_recipe_arguments(p)
        p.add_argument("--data", help="directory written by `slip convert` (sets data.train)")
        p.add_argument("--compare", nargs="+", metavar="OVERRIDES",
                       help='configurations side by side, each a quoted, space-separated set of overrides ("" for the recipe '
                            'as is); ratios are against the first')  # fmt: skip
        p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (default: %(default)s)")
        p.add_argument("--steps", type=int, default=10, help="measured steps (default: %(default)s)")
        p.add_argument("--png", help="write a stacked-bar chart of the stage breakdown to this file")
        p.add_argument("--plain-baseline", action="store_true",
                       help="add, last, the recipe's step as the SLIP reference trains it: plain torch (autocast, AdamW, no DeepSpeed) "
                            "with the reference loss")  # fmt: skip
        p.add_argument("--same-process", action="store_true",
                       help="run the configurations one after another in this process, not each in a fresh one "
                            "(quicker to start; peak memory is then this process's so far)")  # fmt: skip
        p.set_defaults(func=func)
    for p in (pconv, ppipe, ploss, *(targets.choices[n] for n in ("step", "all"))):
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
