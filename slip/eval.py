"""`slip eval zeroshot|linear|retrieval`: a trained or released model, evaluated as SLIP reports it.

A checkpoint is any of: an exported `.safetensors` (`slip export`), a run directory (its
latest complete checkpoint), or a checkpoint released by the SLIP reference (`.pt`/`.pth`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from slip.helptext import DefaultsShown
from slip.output import counts, emit, percent, stdout_to_stderr, table

if TYPE_CHECKING:
    from pipeline.augment_config import AugmentConfig
    from trainer.launch import Launch
    from trainer.models import SlipModel


def open_model(checkpoint: str | Path, *, image_size: int | None = None) -> tuple[SlipModel, AugmentConfig]:
    """The model in eval mode and the evaluation view's settings (the training image size and normalisation)."""
    from pipeline.augment_config import AugmentConfig
    from trainer.checkpoint import latest_weights
    from trainer.release import load_release
    from trainer.weights import load_model_and_config

    path = Path(checkpoint)
    if path.is_dir():
        path = latest_weights(path / "checkpoints")
    if path.suffix in (".pt", ".pth"):
        model = load_release(path, image_size=image_size)  # None: the size it was trained at
        return model.eval(), AugmentConfig(image_size=int(model.visual.patch_embed.img_size[0]))
    model, cfg = load_model_and_config(path)
    if image_size is not None and image_size != cfg.augment.image_size:
        # Its ViT's position embedding is fixed to the training grid; SLIP's releases are resampled on load.
        raise ValueError(f"{path}: --image-size {image_size}: this model was trained at {cfg.augment.image_size} px and evaluates at that size")
    return model, cfg.augment


def _skipped(r: dict) -> str:
    """The line about images left out, or nothing when none was."""
    total = sum(r["skipped"].values())
    if not total:
        return ""
    more = "; ..." if total > len(r["skipped_first"]) else ""
    return f"\nskipped {total} image(s) that cannot be decoded ({counts(r['skipped'])}): {'; '.join(r['skipped_first'])}{more}"


def _check_zeroshot(args: argparse.Namespace) -> None:
    """Option mistakes, in one line, before a model is loaded."""
    if args.benchmark:
        if args.data or args.classnames or args.templates:
            raise ValueError("--benchmark: each suite dataset has its own class names and templates; drop --data, --classnames and --templates")
        if not args.root:
            raise ValueError("--benchmark slip needs --root DIR (one sub-directory per suite dataset)")
    elif not args.data:
        raise ValueError("give --data DIR, or --benchmark slip --root DIR")
    elif args.root:
        raise ValueError("--root goes with --benchmark; for one dataset give --data alone")


def _suite_table(r: dict) -> str:
    """The suite's rows (dataset, metric, value, images, skipped), the failures' reasons, and the mean."""
    rows = [("dataset", "metric", "value", "images", "skipped")]
    for d in r["datasets"]:
        if d["status"] == "ok":
            rows.append((d["dataset"], d["metric"], percent(d["value"], 2), str(d["images"]), str(sum(d["skipped"].values()))))
        else:
            rows.append((d["dataset"], d["metric"], d["status"], "", ""))
    lines = table(rows, label_width=20, cell_width=16)
    lines += [f"{d['dataset']}: {d['error']}" for d in r["datasets"] if d["status"] == "failed"]
    mean = "n/a" if r["mean"] is None else percent(r["mean"], 2)
    lines.append(f"mean over {r['present']} dataset(s) present: {mean} ({r['failed']} failed, {r['missing']} missing)")
    return "\n".join(lines)


def _zeroshot(args: argparse.Namespace, model: SlipModel, augment: AugmentConfig, common: dict) -> tuple[dict, str]:
    from evaluation.prompts import read_lines, templates_option
    from evaluation.zeroshot import eval_zeroshot

    if args.benchmark:
        from evaluation.benchmark import eval_suite

        r = eval_suite(model, augment, args.root, **common)
        return r, _suite_table(r)
    names = read_lines(args.classnames) if args.classnames else None
    templates = templates_option(args.templates) if args.templates else None
    r = eval_zeroshot(model, augment, args.data, classnames=names, templates=templates, **common)
    return r, (f"zero-shot on {args.data}: top-1 {percent(r['top1'], 2)}, top-5 {percent(r['top5'], 2)} "
               f"({r['images']} images, {r['classes']} classes){_skipped(r)}")  # fmt: skip


def _check_linear(args: argparse.Namespace) -> None:
    """Options of the other protocol, refused before a model is loaded; the SGD protocol's defaults filled in."""
    sgd_only = {"--epochs": args.epochs, "--lr": args.lr, "--sgd-batch": args.sgd_batch, "--seed": args.seed}
    if args.protocol == "lbfgs":
        given = [name for name, value in sgd_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --protocol sgd (the logistic regression has no epochs or learning rate)")
        return
    if args.l2:
        raise ValueError("--l2: only with --protocol lbfgs (the SGD protocol has no weight decay)")
    from evaluation.linear_sgd import SgdProtocol

    given = {"epochs": args.epochs, "batch_size": args.sgd_batch, "base_lr": args.lr, "seed": args.seed}
    args.sgd = SgdProtocol(**{k: v for k, v in given.items() if v is not None})  # the protocol's defaults for the rest


def _linear_sgd(args: argparse.Namespace, model: SlipModel, augment: AugmentConfig, common: dict) -> tuple[dict, str]:
    from evaluation.encoder import ImageTower
    from evaluation.linear_sgd import linear_probe_sgd

    r = linear_probe_sgd(ImageTower(model.visual), augment, args.train, args.val, args.sgd, **common)
    line = (f"linear probe (sgd: {r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']:g}) {args.train} -> {args.val}: "
            f"top-1 {percent(r['top1'], 2)}, top-5 {percent(r['top5'], 2)} ({r['n_train']} train, {r['n_val']} val; "
            f"{r['images_per_s']:.0f} training images/s over {r['world_size']} process(es))")  # fmt: skip
    return r, line + _skipped(r)


def _linear(args: argparse.Namespace, model: SlipModel, augment: AugmentConfig, common: dict) -> tuple[dict, str]:
    from evaluation.encoder import ImageTower
    from evaluation.linear_probe import eval_linear

    if args.protocol == "sgd":
        return _linear_sgd(args, model, augment, common)
    grid = [float(v) for v in args.l2.split(",") if v.strip()] if args.l2 else None
    # SLIP's probe reads the image tower's pooled features, before any projection head.
    r = {"protocol": "lbfgs", **eval_linear(ImageTower(model.visual), augment, args.train, args.val, l2_grid=grid, **common)}
    line = f"linear probe {args.train} -> {args.val}: top-1 {percent(r['top1'], 2)} (l2 {r['l2']:g}, {r['n_train']} train, {r['n_val']} val)"
    if r["at_edge"]:
        line += f"\nnote: l2 {r['l2']:g} is at the end of the grid; a wider --l2 grid may do better"
    return r, line + _skipped(r)


def _retrieval(args: argparse.Namespace, model: SlipModel, augment: AugmentConfig, common: dict) -> tuple[dict, str]:
    from evaluation.retrieval import eval_retrieval

    r = eval_retrieval(model, augment, args.data, **common)
    both = {direction: ", ".join(f"{k} {percent(v)}" for k, v in r[direction].items()) for direction in ("image_to_text", "text_to_image")}
    return r, (f"retrieval on {args.data} ({r['images']} images, {r['captions']} captions): "
               f"image->text {both['image_to_text']}; text->image {both['text_to_image']}{_skipped(r)}")  # fmt: skip


_KINDS = {"zeroshot": _zeroshot, "linear": _linear, "retrieval": _retrieval}


def _process_group(device: str, launch: Launch) -> str:
    """Joins the launcher's processes (gloo on the CPU, NCCL on GPUs); the device this rank uses."""
    import datetime

    import torch
    import torch.distributed as dist

    if device == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {launch.local_rank}: this node has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(launch.local_rank)
    # A rank that fails leaves the others waiting in a collective: they give up after the timeout.
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return f"cuda:{launch.local_rank}" if device == "cuda" else "cpu"


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from trainer.launch import launched

    if args.batch_size < 1 or args.threads < 1:
        raise ValueError(f"--batch-size and --threads must be positive, got {args.batch_size} and {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device")
    if args.kind == "zeroshot":
        _check_zeroshot(args)
    if args.kind == "linear":
        _check_linear(args)
    launch = launched()
    if launch.world > 1 and not (args.kind == "linear" and args.protocol == "sgd"):
        raise ValueError(f"{launch.world} processes: only `slip eval linear --protocol sgd` runs over several; run this one as a single process")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if launch.world > 1:
        device = _process_group(device, launch)
    try:
        with stdout_to_stderr():  # stdout carries the figures alone
            model, augment = open_model(args.checkpoint, image_size=args.image_size)
            model = model.to(device)  # images are then decoded on that GPU too
            result, line = _KINDS[args.kind](args, model, augment, {"batch_size": args.batch_size, "threads": args.threads})
    finally:
        if launch.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if launch.rank != 0:  # every rank holds the same figures; the first reports them
        return 0
    if getattr(args, "out", None):
        from pipeline.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    emit(result, line, args.json)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="zero-shot, linear probe or retrieval of a checkpoint")
    kinds = ev.add_subparsers(dest="kind", required=True)
    zs = kinds.add_parser("zeroshot", help="zero-shot classification of a class-per-folder tree or a labelled dataset", formatter_class=DefaultsShown)
    zs.add_argument("--data", help="one sub-folder per class (ImageNet layout), or `slip convert classes` output")
    zs.add_argument("--benchmark", choices=("slip",), help="SLIP's zero-shot suite: every one of its 28 datasets found under --root, "
                    "each with its own class names, templates and metric")  # fmt: skip
    zs.add_argument("--root", help="with --benchmark: ROOT/<name>/ per suite dataset (cifar10, imagenet, ...), "
                    "each a class-per-folder tree or `slip convert classes` output")  # fmt: skip
    zs.add_argument("--classnames", help="one class name per line, in sorted folder order (default: the names a converted dataset "
                    "recorded, else classnames.txt in or beside --data, else ImageNet's for its 1000 WordNet-id folders, "
                    "else the folder names with _ as spaces)")  # fmt: skip
    zs.add_argument("--templates", help="clip80 (CLIP's 80), slip7 (SLIP's 7 for ImageNet), or a file of one prompt per line with {} for the class "
                    "(default: templates.txt in or beside --data, else slip7 for ImageNet's WordNet-id folders, else clip80)")  # fmt: skip
    lin = kinds.add_parser("linear", help="a linear classifier on frozen image features (logistic regression, or the paper's SGD protocol)",
                           formatter_class=DefaultsShown)  # fmt: skip
    lin.add_argument("--train", required=True, help="class-per-folder training images, or `slip convert classes` output")
    lin.add_argument("--val", required=True, help="validation images in either form (the same classes)")
    lin.add_argument("--protocol", choices=("lbfgs", "sgd"), default="lbfgs",
                     help="lbfgs: logistic regression on the features of center crops, its L2 chosen on held-out training images; "
                     "sgd: SLIP's paper protocol, a linear head trained by SGD on augmented views every epoch (also over "
                     "several processes through the deepspeed launcher)")  # fmt: skip
    lin.add_argument("--l2", help="lbfgs: L2 strengths to choose from, comma-separated (default: 1e-8 ... 1e2, a decade apart)")
    lin.add_argument("--epochs", type=int, help="sgd: epochs over the training images (default: 90)")
    lin.add_argument("--lr", type=float, help="sgd: learning rate per 256 images of the batch, decayed by a cosine (default: 0.1)")
    lin.add_argument("--sgd-batch", type=int, help="sgd: the global batch of one SGD step, over all processes (default: 1024)")
    lin.add_argument("--seed", type=int, help="sgd: the head's initialisation, the order and the augmentation (default: 0)")
    ret = kinds.add_parser("retrieval", help="image-text recall@1/5/10 on a captioned dataset", formatter_class=DefaultsShown)
    ret.add_argument("--data", required=True, help="directory written by `slip convert`")
    for p in (zs, lin, ret):
        p.add_argument("--checkpoint", required=True, help="a .safetensors from `slip export`, a run directory, or a SLIP reference .pt")
        p.add_argument("--image-size", type=int, help="evaluation crop (default: the training size; 224 for SLIP's releases)")
        p.add_argument("--batch-size", type=int, default=256, help="images (or captions) encoded at once")
        p.add_argument("--threads", type=int, default=2, help="DALI CPU threads for reading and decoding")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (default: a GPU if there is one)")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.add_argument("--out", help="also write the figures to this JSON file")
        p.set_defaults(func=_cmd_eval)
