"""Every source layout by name: `slip convert <name>` and the tests iterate over this one table.

Each module provides NAME, HELP, add_arguments(parser) and from_args(args), and optionally
manifest_extra(args) (keys recorded in the manifest); adding a layout means writing its module
and listing it here, nothing else.
"""
from __future__ import annotations

from types import ModuleType

from pipeline.sources import cc, classes, coco, csv, folder, redcaps, wds, yfcc

SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (coco, cc, yfcc, redcaps, wds, csv, folder, classes)}
