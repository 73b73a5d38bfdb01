"""The `slip` command line: demo, train, convert."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.convert import ConvertOptions


def _quiet_under_ci() -> None:
    if os.environ.get("CI") == "true":
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's and DeepSpeed's own bars too


def _cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import demo_config, format_table, run_demo

    cfg = demo_config(Path(args.out), args.overrides)
    results = run_demo(cfg)
    print(format_table(results))
    print(f"results: {cfg.run_dir / 'results.json'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config, require_train_data
    from trainer.loop import TrainingStopped, train

    cfg = load_config(args.config, args.overrides)
    require_train_data(cfg)
    try:
        result = train(cfg)
    except TrainingStopped as stopped:
        print(f"slip: stopped: {stopped}", file=sys.stderr)
        return 3
    if not result.dist.is_main:
        return 0
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    if result.stopped_by_signal:
        print(f"stopped by a signal at step {result.steps}{resumed}, checkpoint written; run again to resume: {result.run_dir}")
    else:
        print(f"trained to step {result.steps}{resumed}; run directory: {result.run_dir}")
    return 0


def _convert_options(args: argparse.Namespace) -> ConvertOptions:
    from pipeline.convert import ConvertOptions

    return ConvertOptions(
        max_side=args.max_side,
        quality=args.quality,
        captions_per_image=args.captions_per_image,
        shard_size=args.shard_size,
        workers=args.workers,
        limit=args.limit,
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.convert import convert

    module = args.source_module
    extra = module.manifest_extra(args) if hasattr(module, "manifest_extra") else None
    samples = module.from_args(args)
    try:
        manifest = convert(samples, args.out, source=args.source, options=_convert_options(args), resume=args.resume, extra=extra)
    except KeyboardInterrupt:
        print(f"slip: interrupted; complete shards are kept in {args.out}: rerun with --resume", file=sys.stderr)
        return 130
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shard(s) to {args.out}; skipped: {skipped}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.reader import BetonDataset

    ds = BetonDataset(args.dir)
    m = ds.manifest
    print(f"{args.dir}: {m['samples']} samples from '{m['source']}' in {len(m['shards'])} shard(s), {ds.nbytes / 2**20:.1f} MiB")
    print(f"  images: JPEG, longest side <= {m['max_side']}, quality {m['quality']}")
    print(f"  captions: up to {m['captions_per_image']} per image, {m['tokenizer']}, {m['context_length']} tokens")
    print(f"  captions per image: mean {ds.n_captions.mean():.2f}, min {ds.n_captions.min()}, max {ds.n_captions.max()}")
    skipped = ", ".join(f"{k}={v}" for k, v in m["skipped"].items()) or "none"
    print(f"  skipped: {skipped}")
    if args.grid:
        from pipeline.contact_sheet import contact_sheet

        if not args.png:
            raise ValueError("--grid needs --png FILE to write the contact sheet to")
        print(f"  contact sheet of {min(args.grid, len(ds))} samples: {contact_sheet(ds, args.grid, args.png)}")
    return 0


def _cmd_profile_convert(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile

    from pipeline.convert_bench import compare, synthetic_images

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    scratch = None
    if args.images:
        images = Path(args.images)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="slip-bench-images-"))
        images = synthetic_images(scratch / "images", args.synthetic)
    try:
        results = compare(images, workers, max_side=args.max_side, quality=args.quality, shard_size=args.shard_size)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{results['images']} images, max side {results['max_side']}, quality {results['quality']}, "
          f"shards of {results['shard_size']}, {results['cores']} cores")  # fmt: skip
    print(f"  baseline (PIL, one process)  {results['baseline']['images_per_s']:8.1f} images/s")
    for w in workers:
        r = results[f"slipstream_workers_{w}"]
        print(f"  slip convert, {w} worker(s)    {r['images_per_s']:8.1f} images/s  {r['ratio']:.2f}x")
    return 0


def _cmd_profile_pipeline(args: argparse.Namespace) -> int:
    import json

    from pipeline.pipeline_bench import compare_pipelines

    r = compare_pipelines(
        args.data, device=args.device, batch_size=args.batch_size, image_size=args.image_size,
        workers=args.workers, source_workers=args.source_workers, steps=args.steps,
    )  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{args.data}: batches of {r['batch_size']} x 3 views of {r['image_size']} px, {r['workers']} workers, "
          f"{r['source_workers']} source workers, {r['device']}")  # fmt: skip
    print(f"  baseline (PIL + torchvision, DataLoader)  {r['baseline']['samples_per_s']:8.1f} samples/s")
    print(f"  slipstream (DALI {r['device']})             {r['slipstream']['samples_per_s']:8.1f} samples/s  {r['ratio']:.2f}x")
    return 0


def _cmd_profile_loss(args: argparse.Namespace) -> int:
    import json

    from kernels.loss_bench import profile_loss

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    r = profile_loss(args.batch, args.dim, backends, device=args.device, dtype=args.dtype, repeats=args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if all("error" not in v for v in r["backends"].values()) else 1
    print(f"SLIP loss forward + backward: batch {r['batch']}, dim {r['dim']} (SimCLR {r['ssl_dim']}), {r['dtype']} on {r['device']}")
    for name, v in r["backends"].items():
        if "error" in v:
            print(f"  {name:10s} failed: {v['error']}")
            continue
        ratios = f"  {v['time_ratio']:.2f}x time, {v['memory_ratio']:.3f}x memory" if "time_ratio" in v else ""
        print(f"  {name:10s} {v['seconds']:8.2f} s  {v['extra_peak_bytes'] / 2**20:9.0f} MiB extra peak{ratios}")
    return 0 if all("error" not in v for v in r["backends"].values()) else 1


@contextlib.contextmanager
def _stdout_to_stderr():
    """What libraries print while measuring (DeepSpeed's logs and build messages, at the file
    descriptor level, child processes included) goes to stderr: stdout carries only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _profile_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe's overrides, `--data` first (an explicit data.train=... after it wins)."""
    return [*([f"data.train={args.data}"] if args.data else []), *args.overrides]


def _step_report(args: argparse.Namespace) -> dict:
    from trainer.step_profile import compare_steps

    if args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--warmup must be 0 or more and --steps at least 1, got {args.warmup} and {args.steps}")
    if args.png and not Path(args.png).resolve().parent.is_dir():
        raise FileNotFoundError(f"{Path(args.png).parent}: no such directory for --png")
    variants = [v.split() for v in args.compare] if args.compare else [[]]
    # Under a multi-rank launcher every rank must run the same configurations together, in its own process.
    same_process = args.same_process or int(os.environ.get("WORLD_SIZE", "1")) > 1
    with _stdout_to_stderr():
        return compare_steps(args.config, _profile_overrides(args), variants, warmup=args.warmup, steps=args.steps, fresh_processes=not same_process)


def _write_step_chart(report: dict, path: str) -> None:
    from trainer.profile_chart import stage_chart

    bars = [(c["name"], c["stages_ms"]) for c in report["configs"] if "error" not in c]
    if bars:
        title = f"slip profile step: {report['recipe']}, median of each stage, ms"
        print(f"chart: {stage_chart(bars, path, title=title)}", file=sys.stderr)


def _cmd_profile_step(args: argparse.Namespace) -> int:
    import json

    from trainer.step_profile import format_table

    report = _step_report(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.png:
        _write_step_chart(report, args.png)
    return 0 if all("error" not in c for c in report["configs"]) else 1


def _cmd_profile_all(args: argparse.Namespace) -> int:
    """Pipeline, loss and step for one recipe: the three places a step's time can go."""
    import json

    from kernels.loss_bench import profile_loss
    from pipeline.pipeline_bench import compare_pipelines
    from trainer.config import load_config, require_train_data
    from trainer.engine import pick_device
    from trainer.objectives import get_objective
    from trainer.step_profile import PROFILE_DATA_HINT, format_table

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("slip profile all runs in one process; under a launcher use `slip profile step`")
    cfg = load_config(args.config, _profile_overrides(args))
    require_train_data(cfg, PROFILE_DATA_HINT)
    device = pick_device(cfg.engine.device)
    views = get_objective(cfg.model.objective).views
    backends = list(dict.fromkeys(["reference", cfg.loss.backend]))
    dtype = "bfloat16" if cfg.engine.precision == "bf16" else "float32"
    with _stdout_to_stderr():
        pipeline = compare_pipelines(
            cfg.data.train, device="gpu" if device == "cuda" else "cpu", batch_size=cfg.data.batch_size,
            image_size=cfg.augment.image_size, views=views, workers=cfg.data.threads, steps=args.steps,
        )  # fmt: skip
        loss = profile_loss(cfg.data.batch_size, cfg.model.embed_dim, backends, device=device, dtype=dtype, repeats=3)
    step = _step_report(args)
    if args.json:
        print(json.dumps({"pipeline": pipeline, "loss": loss, "step": step}, indent=2))
    else:
        p = pipeline
        print(f"pipeline: {p['slipstream']['samples_per_s']:.1f} samples/s (DALI {p['device']}) vs "
              f"{p['baseline']['samples_per_s']:.1f} (PIL + torchvision): {p['ratio']:.2f}x; batch {p['batch_size']}, {p['image_size']} px")  # fmt: skip
        for name, v in loss["backends"].items():
            extra = f", {v['time_ratio']:.2f}x time" if "time_ratio" in v else ""
            print(f"loss {name}: " + (f"failed: {v['error']}" if "error" in v else f"{1e3 * v['seconds']:.1f} ms forward+backward{extra}, "
                                       f"{v['extra_peak_bytes'] / 2**20:.0f} MiB extra"))  # fmt: skip
        print(format_table(step))
    if args.png:
        _write_step_chart(step, args.png)
    return 0 if all("error" not in c for c in step["configs"]) else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from trainer.evaluate import eval_linear, eval_retrieval, eval_zeroshot, load_eval_model
    from trainer.zeroshot import read_lines

    import torch

    if args.batch_size < 1 or args.threads < 1:
        raise ValueError(f"--batch-size and --threads must be positive, got {args.batch_size} and {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device")
    with _stdout_to_stderr():  # stdout carries the figures alone
        model, augment = load_eval_model(args.checkpoint, image_size=args.image_size)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)  # images are then decoded on that GPU too
        common = {"batch_size": args.batch_size, "threads": args.threads}
        if args.kind == "zeroshot":
            names = read_lines(args.classnames) if args.classnames else None
            templates = read_lines(args.templates) if args.templates else None
            r = eval_zeroshot(model, augment, args.data, classnames=names, templates=templates, **common)
            line = f"zero-shot on {args.data}: top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}% ({r['images']} images, {r['classes']} classes)"
        elif args.kind == "linear":
            grid = [float(v) for v in args.l2.split(",") if v.strip()] if args.l2 else None
            r = eval_linear(model, augment, args.train, args.val, l2_grid=grid, **common)
            line = f"linear probe {args.train} -> {args.val}: top-1 {100 * r['top1']:.2f}% (l2 {r['l2']:g}, {r['n_train']} train, {r['n_val']} val)"
            if r["at_edge"]:
                line += f"\nnote: l2 {r['l2']:g} is at the end of the grid; a wider --l2 grid may do better"
        else:
            r = eval_retrieval(model, augment, args.data, **common)
            fmt = lambda d: ", ".join(f"{k} {100 * v:.1f}%" for k, v in d.items())  # noqa: E731
            line = (f"retrieval on {args.data} ({r['images']} images, {r['captions']} captions): "
                    f"image->text {fmt(r['image_to_text'])}; text->image {fmt(r['text_to_image'])}")  # fmt: skip
    print(json.dumps(r, indent=2) if args.json else line)
    return 0


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="zero-shot, linear probe or retrieval of a checkpoint")
    kinds = ev.add_subparsers(dest="kind", required=True)
    zs = kinds.add_parser("zeroshot", help="zero-shot classification of a class-per-folder tree or a labelled dataset")
    zs.add_argument("--data", required=True, help="one sub-folder per class (ImageNet layout), or `slip convert classes` output")
    zs.add_argument("--classnames", help="one class name per line, in sorted folder order (default: the dataset's, else ImageNet's)")
    zs.add_argument("--templates", help="one prompt per line with {} for the class (default: CLIP's 80)")
    lin = kinds.add_parser("linear", help="logistic regression on frozen image features")
    lin.add_argument("--train", required=True, help="class-per-folder training images, or `slip convert classes` output")
    lin.add_argument("--val", required=True, help="validation images in either form (the same classes)")
    lin.add_argument("--l2", help="L2 strengths to choose from, comma-separated (default: 1e-8 ... 1e2, a decade apart)")
    ret = kinds.add_parser("retrieval", help="image-text recall@1/5/10 on a captioned dataset")
    ret.add_argument("--data", required=True, help="directory written by `slip convert`")
    for p in (zs, lin, ret):
        p.add_argument("--checkpoint", required=True, help="a .safetensors from `slip export`, a run directory, or a SLIP reference .pt")
        p.add_argument("--image-size", type=int, help="evaluation crop (default: the training size; 224 for SLIP's releases)")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (default: a GPU if there is one)")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.set_defaults(func=_cmd_eval)


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify

    checked, problems = verify(args.dir)
    for problem in problems:
        print(f"slip: verify: {problem}", file=sys.stderr)
    if problems:
        print(f"slip: error: {args.dir}: {len(problems)} problem(s) in {checked} samples", file=sys.stderr)
        return 1
    print(f"{args.dir}: all {checked} samples decode and match their tokens, text and checksums")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run, read_weights

    out = export_run(Path(args.run), Path(args.out))
    state, _ = read_weights(out)  # read back: the summary describes the file as written
    values = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {values:,} parameters and buffers")
    return 0


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (must not hold a converted dataset)")
    p.add_argument("--max-side", type=int, default=384, help="longest image side after resizing (default 384)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions kept per image, K (default 5)")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per .beton shard (default 10000)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    p.add_argument("--limit", type=int, default=0, help="convert only the first N source records (default: all)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slip", description="SLIP / CLIP / SimCLR pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate, convert, train and evaluate a tiny SLIP on the CPU")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    demo.set_defaults(func=_cmd_demo)

    tr = sub.add_parser("train", help="train from a recipe in one process (use `deepspeed --module trainer.train` for many)")
    tr.add_argument("--config", required=True, help="recipe name in configs/ or a YAML path")
    tr.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    tr.set_defaults(func=_cmd_train)

    from pipeline.sources.registry import SOURCES

    conv = sub.add_parser("convert", help="convert an image-caption dataset to .beton shards")
    sources = conv.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, module in SOURCES.items():
        p = sources.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        _add_convert_options(p)
        p.set_defaults(func=_cmd_convert, source_module=module)

    insp = sub.add_parser("inspect", help="summarise a converted dataset; --grid N --png FILE draws samples")
    insp.add_argument("dir", help="directory written by `slip convert`")
    insp.add_argument("--grid", type=int, default=0, help="draw N evenly spaced samples with their captions")
    insp.add_argument("--png", help="where to write the contact sheet")
    insp.set_defaults(func=_cmd_inspect)

    prof = sub.add_parser("profile", help="measure throughput, side by side with a baseline")
    targets = prof.add_subparsers(dest="target", required=True)
    pconv = targets.add_parser("convert", help="slip convert against a plain single-process PIL loop")
    pconv.add_argument("--images", help="folder of JPEGs with sidecar captions (default: --synthetic of them)")
    pconv.add_argument("--synthetic", type=int, default=1000, help="generate N 400-640 px JPEGs when no --images")
    pconv.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated (default 1,2)")
    pconv.add_argument("--max-side", type=int, default=384)
    pconv.add_argument("--quality", type=int, default=90)
    pconv.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    pconv.add_argument("--json", action="store_true", help="print the figures as JSON")
    pconv.set_defaults(func=_cmd_profile_convert)

    ppipe = targets.add_parser("pipeline", help="the DALI three-view loader against the PIL + torchvision reference")
    ppipe.add_argument("--data", required=True, help="directory written by `slip convert`")
    ppipe.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ppipe.add_argument("--batch-size", type=int, default=64)
    ppipe.add_argument("--image-size", type=int, default=224)
    ppipe.add_argument("--workers", type=int, default=0, help="CPU threads/workers for both (default: every core)")
    ppipe.add_argument("--source-workers", type=int, default=0, help="processes reading JPEG bytes for DALI (default 0)")
    ppipe.add_argument("--steps", type=int, default=10, help="measured batches (after 3 warm-up ones)")
    ppipe.add_argument("--json", action="store_true", help="print the figures as JSON")
    ppipe.set_defaults(func=_cmd_profile_pipeline)

    ploss = targets.add_parser("loss", help="contrastive loss backends: time and peak memory of forward + backward")
    ploss.add_argument("--batch", type=int, required=True, help="global batch B (one process holds all of it)")
    ploss.add_argument("--dim", type=int, default=512, help="CLIP embedding width (SimCLR's is 256)")
    ploss.add_argument("--backend", default="reference,chunked", help="backends, comma-separated; ratios are against the first")
    ploss.add_argument("--device", default="cpu", help="cpu or cuda")
    ploss.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ploss.add_argument("--repeats", type=int, default=1, help="runs per backend; the fastest is reported")
    ploss.add_argument("--json", action="store_true", help="print the figures as JSON")
    ploss.set_defaults(func=_cmd_profile_loss)

    for name, helptext, func in (
        ("step", "the real training step, stage by stage: times, samples/s, data stall, memory, MFU", _cmd_profile_step),
        ("all", "pipeline, loss and step of one recipe", _cmd_profile_all),
    ):
        p = targets.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="recipe name in configs/ or a YAML path")
        p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
        p.add_argument("--data", help="directory written by `slip convert` (sets data.train)")
        p.add_argument("--compare", nargs="+", metavar="OVERRIDES",
                       help='configurations side by side, each a quoted, space-separated set of overrides ("" for the recipe '
                            'as is); ratios are against the first')  # fmt: skip
        p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured (default 3)")
        p.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.add_argument("--png", help="write a stacked-bar chart of the stage breakdown to this file")
        p.add_argument("--same-process", action="store_true",
                       help="run the configurations one after another in this process, not each in a fresh one "
                            "(quicker to start; peak memory is then this process's so far)")  # fmt: skip
        p.set_defaults(func=func)

    _add_eval_parsers(sub)

    ver = sub.add_parser("verify", help="decode every sample and check tokens, text and checksums")
    ver.add_argument("dir", help="directory written by `slip convert`")
    ver.set_defaults(func=_cmd_verify)

    exp = sub.add_parser("export", help="write a run's latest checkpoint as plain safetensors weights with its config")
    exp.add_argument("run", help="run directory written by `slip train`")
    exp.add_argument("--out", required=True, help="the .safetensors file to write (replaced if it exists)")
    exp.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_under_ci()
    # The deepspeed launcher appends --local_rank=N (`deepspeed --module trainer.cli profile step ...`);
    # the rank is read from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        if os.environ.get("SLIP_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"slip: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
