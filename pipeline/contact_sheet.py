"""`slip inspect --grid N --png FILE`: a picture of N samples with their first caption."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.atomic import replacing
from pipeline.reader import BetonDataset

TILE = 192  # pixels per image tile
TEXT_LINES = 4
LINE_HEIGHT = 12


def contact_sheet(ds: BetonDataset, n: int, path: str | Path) -> Path:
    """Evenly spaced samples, one tile each, written atomically as a PNG; returns the path."""
    if n < 1:
        raise ValueError(f"--grid must be at least 1, got {n}")
    indices = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    cols = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / cols)
    cell_h = TILE + TEXT_LINES * LINE_HEIGHT + 8
    sheet = Image.new("RGB", (cols * TILE, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, i in enumerate(indices):
        x, y = (k % cols) * TILE, (k // cols) * cell_h
        with Image.open(io.BytesIO(ds.jpeg(int(i)).tobytes())) as image:
            image = ImageOps.contain(image.convert("RGB"), (TILE - 4, TILE - 4))  # small images scale up too
            sheet.paste(image, (x + (TILE - image.width) // 2, y + (TILE - image.height) // 2))
        caption = ds.captions(int(i))[0]
        for line_no, line in enumerate(textwrap.wrap(f"{i}: {caption}", 30)[:TEXT_LINES]):
            draw.text((x + 4, y + TILE + line_no * LINE_HEIGHT), line, fill="black", font=font)
    path = Path(path)
    with replacing(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return path
