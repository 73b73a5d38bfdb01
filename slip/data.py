"""`slip convert`, `slip inspect`, `slip verify`: datasets into .beton shards, and what is in them.

The verbs import the pipeline when they run: it brings torch and FFCV, seconds that `slip
--help` or a mistyped option should not wait for.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.sources.registry import SOURCES
from slip.helptext import DefaultsShown
from slip.output import counts

if TYPE_CHECKING:
    from pipeline.convert import ConvertOptions

DEFAULT_GRID = 16  # samples on a contact sheet asked for with --png alone
SHOWN_SKIPS = 20  # skipped records `slip inspect` names: all of them, where there are no more


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
    if manifest["skipped"]:
        print(f"  each skipped record is named in {args.out}/{manifest['skipped_log']}")
    if manifest["captions_dropped"]:
        print(f"  captions dropped: {counts(manifest['captions_dropped'])}")
    return 0


def _named_skips(directory: str, skipped: dict[str, int]) -> list[str]:
    """The first few skipped records, one line each, and where the rest are."""
    from pipeline.skips import SKIP_LOG, read_skipped

    lines = []
    for skip in read_skipped(directory, SHOWN_SKIPS):
        where = f" ({skip['path']})" if "path" in skip else ""
        detail = f": {skip['detail']}" if "detail" in skip else ""
        lines.append(f"    {skip['reason']}: {skip['id']}{where}{detail}")
    if sum(skipped.values()) > len(lines):
        lines.append(f"    ... all {sum(skipped.values())} in {directory}/{SKIP_LOG}")
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.contact_sheet import contact_sheet
    from pipeline.reader import BetonDataset

    # Checked first: a run that exits 0 must have written the sheet that was asked for.
    if args.grid is not None and args.grid < 1:
        raise ValueError(f"--grid must be at least 1, got {args.grid}")
    if args.grid is not None and not args.png:
        raise ValueError("--grid needs --png FILE to write the contact sheet to")
    ds = BetonDataset(args.dir)
    m = ds.manifest
    print(f"{args.dir}: {m['samples']} samples from '{m['source']}' in {len(m['shards'])} shard(s), {ds.nbytes / 2**20:.1f} MiB")
    print(f"  images: JPEG, longest side <= {m['max_side']}, quality {m['quality']}")
    print(f"  captions: up to {m['captions_per_image']} per image, {m['tokenizer']}, {m['context_length']} tokens")
    print(f"  captions per image: mean {ds.n_captions.mean():.2f}, min {ds.n_captions.min()}, max {ds.n_captions.max()}")
    print(f"  skipped: {counts(m['skipped'])}")
    for line in _named_skips(args.dir, m["skipped"]):
        print(line)
    if m.get("captions_dropped"):
        print(f"  captions dropped: {counts(m['captions_dropped'])}")
    if args.png:
        grid = DEFAULT_GRID if args.grid is None else args.grid
        print(f"  contact sheet of {min(grid, len(ds))} samples: {contact_sheet(ds, grid, args.png)}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify

    checked, problems = verify(args.dir)
    if problems:
        # The report is the output; the failure is one line, as for every verb.
        for problem in problems:
            print(problem)
        print(f"slip: error: {args.dir}: {len(problems)} problem(s) in {checked} samples, first: {problems[0]}", file=sys.stderr)
        return 1
    print(f"{args.dir}: all {checked} samples decode and match their tokens, text and checksums")
    return 0


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not hold a converted dataset)")
    p.add_argument("--max-side", type=int, default=384, metavar="PX", help="longest image side after resizing, in pixels")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality (1-100) of re-encoded images")
    p.add_argument(
        "--captions-per-image",
        type=int,
        default=5,
        metavar="K",
        help="captions kept per image: the first K non-empty ones (the rest are counted as extra_caption)",
    )
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="samples per .beton shard")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes; 0 means one per core")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="convert only the first N source records; 0 means all")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into --out")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert an image-caption dataset to .beton shards", formatter_class=DefaultsShown)
    sources = conv.add_subparsers(dest="source", required=True, metavar="SOURCE", help="the dataset's layout")
    for name, module in SOURCES.items():
        p = sources.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=DefaultsShown)
        module.add_arguments(p)
        _add_convert_options(p)
        p.set_defaults(func=_cmd_convert, source_module=module)

    insp = sub.add_parser(
        "inspect",
        help="summarise a converted dataset and name its first skipped records; --png FILE draws samples",
        formatter_class=DefaultsShown,
    )
    insp.add_argument("dir", help="directory written by `slip convert`")
    insp.add_argument(
        "--grid", type=int, metavar="N", help=f"samples on the contact sheet, evenly spaced (default with --png: {DEFAULT_GRID})"
    )
    insp.add_argument("--png", metavar="FILE", help="write a contact sheet of samples and their first captions to FILE")
    insp.set_defaults(func=_cmd_inspect)

    ver = sub.add_parser("verify", help="decode every sample and check tokens, text and checksums", formatter_class=DefaultsShown)
    ver.add_argument("dir", help="directory written by `slip convert`")
    ver.set_defaults(func=_cmd_verify)
