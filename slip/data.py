"""`slip convert`, `slip inspect`, `slip verify`: datasets into .beton shards, and what is in them.

The verbs import the pipeline when they run: it brings torch and FFCV, seconds that `slip
--help` or a mistyped option should not wait for.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.sources.registry import SOURCES
from slip.output import counts

if TYPE_CHECKING:
    from pipeline.convert import ConvertOptions


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
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shard(s) to {args.out}; skipped: {counts(manifest['skipped'])}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.contact_sheet import contact_sheet
    from pipeline.reader import BetonDataset

    ds = BetonDataset(args.dir)
    m = ds.manifest
    print(f"{args.dir}: {m['samples']} samples from '{m['source']}' in {len(m['shards'])} shard(s), {ds.nbytes / 2**20:.1f} MiB")
    print(f"  images: JPEG, longest side <= {m['max_side']}, quality {m['quality']}")
    print(f"  captions: up to {m['captions_per_image']} per image, {m['tokenizer']}, {m['context_length']} tokens")
    print(f"  captions per image: mean {ds.n_captions.mean():.2f}, min {ds.n_captions.min()}, max {ds.n_captions.max()}")
    print(f"  skipped: {counts(m['skipped'])}")
    if args.grid:
        if not args.png:
            raise ValueError("--grid needs --png FILE to write the contact sheet to")
        print(f"  contact sheet of {min(args.grid, len(ds))} samples: {contact_sheet(ds, args.grid, args.png)}")
    return 0


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


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (must not hold a converted dataset)")
    p.add_argument("--max-side", type=int, default=384, help="longest image side after resizing (default 384)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions kept per image, K (default 5)")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per .beton shard (default 10000)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    p.add_argument("--limit", type=int, default=0, help="convert only the first N source records (default: all)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into --out")


def add_parsers(sub: argparse._SubParsersAction) -> None:
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

    ver = sub.add_parser("verify", help="decode every sample and check tokens, text and checksums")
    ver.add_argument("dir", help="directory written by `slip convert`")
    ver.set_defaults(func=_cmd_verify)
