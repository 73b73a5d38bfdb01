"""The demo dataset (`slip demo`, the tests): coloured shapes with captions, generated here, never downloaded.

A contrastive model can only match these captions by learning colour and shape (and, for
two objects, which is where), so zero-shot accuracy on the held-out split measures learning:
an untrained model sits at chance, 1 / (len(COLOURS) * len(SHAPES)).

Layout under ``out_dir`` (a contract: the converter and the evaluator read it)::

    train/000000.jpg, train/000000.txt, ...   image + captions_per_image distinct captions
    zeroshot/<colour>_<shape>/0000.jpg, ...   one object of that class (DALI file_root layout)
    classnames.txt                            "<colour> <shape>", line k = DALI label k
    templates.txt                             TEMPLATES, one per line
    spec.json                                 the ShapesSpec + "format"; written last
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

FORMAT = 1

# Saturated and far apart in RGB, so JPEG, colour jitter and antialiasing never blur two together.
_RGB: Mapping[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 30),
    "purple": (140, 55, 190),
    "orange": (245, 130, 20),
}
COLOURS: tuple[str, ...] = tuple(_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a drawing of a {}.", "an image of a {}.", "a {} on a plain background.",
    "a picture of a {}.", "a rendering of a {}.", "a photo of the {}.", "a simple {}.",
)

# Sorted by folder name, because that is the order in which DALI's file reader numbers labels.
_CLASSES: tuple[tuple[str, str], ...] = tuple(
    sorted(itertools.product(COLOURS, SHAPES), key=lambda c: f"{c[0]}_{c[1]}")
)
_SIZES = {"small": (0.25, 0.35), "large": (0.45, 0.60)}  # bounding-box side / image side
_SUPERSAMPLE = 4
_MARGIN = 1  # pixels, so every object is whole inside the frame

# Fields: o / so = "a red star" / "a small red star"; every template names colour and shape.
_ONE_OBJECT = (
    "{so}",
    "{o}",
    "a picture of {so}",
    "a photo of {o}",
    "{o} {pos}",
    "there is {so} {pos}",
    "{o} on a {bg} background",
    "{so} on a {bg} background",
    "a {size} {shape} coloured {colour}",
    "one {colour} {shape} {pos}",
)
# Fields: a / b = first / second object (sa, sb with size); "{a} {rel} {b}" is true of the image.
_TWO_OBJECTS = (
    "{sa} {rel} {b}",
    "{sb} {inv} {a}",
    "{a} and {b}",
    "{b} and {a}",
    "a picture of {a} {rel} {sb}",
    "there is {sa} {rel} {sb}",
    "{a} {rel} {b} on a {bg} background",
    "two shapes: {sa} and {sb}",
    "a photo of {b} {inv} {a}",
    "{sa} and {sb} on a {bg} background",
)
_RELATIONS = {"x": ("to the left of", "to the right of"), "y": ("above", "below")}
_MAX_CAPTIONS = min(len(_ONE_OBJECT), len(_TWO_OBJECTS))
_DATASET_ENTRIES = frozenset({"train", "zeroshot", "classnames.txt", "templates.txt", "spec.json"})


@dataclass(frozen=True)
class ShapesSpec:
    seed: int = 0
    train_size: int = 4000
    zeroshot_per_class: int = 10
    image_size: int = 64
    captions_per_image: int = 4

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.train_size <= 999_999:  # six-digit file names keep sorted order = index
            raise ValueError(f"train_size must be in [0, 999999], got {self.train_size}")
        if not 1 <= self.zeroshot_per_class <= 9_999:
            raise ValueError(f"zeroshot_per_class must be in [1, 9999], got {self.zeroshot_per_class}")
        if self.image_size < 32:  # below this a small star and a small circle look alike
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.captions_per_image <= _MAX_CAPTIONS:
            raise ValueError(f"captions_per_image must be in [1, {_MAX_CAPTIONS}], got {self.captions_per_image}")


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    size: str  # "small" | "large"
    side: int  # bounding-box side in output pixels
    x: int = 0  # top-left corner of the bounding box
    y: int = 0

    def phrase(self, sized: bool = False) -> str:
        words = f"{self.size} {self.colour} {self.shape}" if sized else f"{self.colour} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


def _sample_object(rng: np.random.Generator, n: int, size: str, colour: str | None = None,
                   shape: str | None = None) -> _Object:
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    lo, hi = _SIZES[size]
    return _Object(colour, shape, size, round(rng.uniform(lo, hi) * n))


def _place_anywhere(rng: np.random.Generator, obj: _Object, n: int) -> _Object:
    x, y = rng.integers(_MARGIN, n - _MARGIN - obj.side, size=2, endpoint=True)
    return replace(obj, x=int(x), y=int(y))


def _sample_pair(rng: np.random.Generator, n: int) -> tuple[_Object, _Object, str]:
    """Two objects of different classes, disjoint along one axis so 'left of' / 'above' is unambiguous."""
    # Two large objects cannot sit side by side; every other size pair fits.
    first_size, second_size = (("small", "small"), ("small", "large"), ("large", "small"))[rng.integers(3)]
    first = _sample_object(rng, n, first_size)
    second = _sample_object(rng, n, second_size)
    while (second.colour, second.shape) == (first.colour, first.shape):
        second = _sample_object(rng, n, second_size)
    gap = max(1, round(0.03 * n))
    overshoot = first.side + gap + second.side + 2 * _MARGIN - n  # from rounding, at some image sizes
    if overshoot > 0:  # take it off the larger object
        if first.side > second.side:
            first = replace(first, side=first.side - overshoot)
        else:
            second = replace(second, side=second.side - overshoot)
    along_first = rng.integers(_MARGIN, n - _MARGIN - second.side - gap - first.side, endpoint=True)
    along_second = rng.integers(along_first + first.side + gap, n - _MARGIN - second.side, endpoint=True)
    across_first = rng.integers(_MARGIN, n - _MARGIN - first.side, endpoint=True)
    across_second = rng.integers(_MARGIN, n - _MARGIN - second.side, endpoint=True)
    axis = "xy"[rng.integers(2)]
    across = "y" if axis == "x" else "x"
    first = replace(first, **{axis: int(along_first), across: int(across_first)})
    second = replace(second, **{axis: int(along_second), across: int(across_second)})
    return first, second, axis


def _background(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    """A flat or linearly graded tone; low saturation so no background passes for one of COLOURS."""
    def tone() -> np.ndarray:
        return rng.uniform(55, 200) + rng.uniform(-10, 10, size=3)

    start = tone()
    end = tone() if rng.random() < 0.5 else start
    angle = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(n) + 0.5) / n
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # (n, n)
    t = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    image = start + t[..., None] * (end - start)  # (n, n, 3)
    brightness = image.mean()
    return image, "dark" if brightness < 95 else "light" if brightness > 160 else "grey"


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Unit polygon turned by at most 15 degrees: variety without a square reading as a diamond."""
    corners = {"square": 4, "triangle": 3, "star": 10}[shape]
    turn = rng.uniform(-np.pi / 12, np.pi / 12) + (np.pi / 4 if shape == "square" else 0.0)
    angles = -np.pi / 2 + turn + 2 * np.pi * np.arange(corners) / corners
    radius = np.where(np.arange(corners) % 2 == 1, 0.45, 1.0) if shape == "star" else np.ones(corners)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)  # (corners, 2)


def _mask(rng: np.random.Generator, obj: _Object, n: int) -> np.ndarray:
    """Coverage in [0, 1], (n, n): drawn at _SUPERSAMPLE x and box-averaged down, so edges are antialiased."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (n * s, n * s), 0)
    box = np.array([obj.x, obj.y, obj.x + obj.side, obj.y + obj.side]) * s - [0, 0, 1, 1]
    if obj.shape == "circle":
        ImageDraw.Draw(canvas).ellipse(box.tolist(), fill=255)
    else:
        points = _outline(rng, obj.shape)
        lo, hi = points.min(axis=0), points.max(axis=0)
        scale = (box[2] - box[0]) / (hi - lo).max()
        placed = (points - (lo + hi) / 2) * scale + (box[:2] + box[2:]) / 2
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in placed.tolist()], fill=255)
    return np.asarray(canvas.reduce(s), dtype=np.float64) / 255.0


def _render(rng: np.random.Generator, objects: list[_Object], n: int) -> tuple[Image.Image, str]:
    image, background = _background(rng, n)
    for obj in objects:
        coverage = _mask(rng, obj, n)[..., None]
        rgb = np.clip(np.array(_RGB[obj.colour]) + rng.uniform(-12, 12, size=3), 0, 255)
        image = image * (1 - coverage) + rgb * coverage
    image = image + rng.normal(0.0, rng.uniform(2, 5), size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)), background


def _position(obj: _Object, n: int) -> str:
    cx, cy = obj.x + obj.side / 2, obj.y + obj.side / 2
    h = "left" if cx < n / 3 else "right" if cx > 2 * n / 3 else ""
    v = "top" if cy < n / 3 else "bottom" if cy > 2 * n / 3 else ""
    if h and v:
        return f"in the {v} {h} corner"
    return f"on the {h}" if h else f"at the {v}" if v else "in the middle"


def _captions(rng: np.random.Generator, templates: tuple[str, ...], fields: dict[str, str], k: int) -> list[str]:
    captions: list[str] = []
    for i in rng.permutation(len(templates)):
        caption = templates[i].format(**fields)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == k:
            break
    return captions


def _train_sample(spec: ShapesSpec, index: int) -> tuple[Image.Image, list[str]]:
    # One stream per image: a smaller train_size yields a prefix of the same images.
    rng = np.random.default_rng([spec.seed, 0, index])
    n, k = spec.image_size, spec.captions_per_image
    if rng.random() < 0.5:
        obj = _place_anywhere(rng, _sample_object(rng, n, ("small", "large")[rng.integers(2)]), n)
        image, background = _render(rng, [obj], n)
        fields = dict(o=obj.phrase(), so=obj.phrase(sized=True), pos=_position(obj, n), bg=background,
                      size=obj.size, colour=obj.colour, shape=obj.shape)
        return image, _captions(rng, _ONE_OBJECT, fields, k)
    first, second, axis = _sample_pair(rng, n)
    image, background = _render(rng, [first, second], n)
    rel, inv = _RELATIONS[axis]
    fields = dict(a=first.phrase(), sa=first.phrase(sized=True), b=second.phrase(),
                  sb=second.phrase(sized=True), rel=rel, inv=inv, bg=background)
    return image, _captions(rng, _TWO_OBJECTS, fields, k)


def _zeroshot_image(spec: ShapesSpec, label: int, index: int) -> Image.Image:
    rng = np.random.default_rng([spec.seed, 1, label, index])  # never overlaps the train streams
    n = spec.image_size
    colour, shape = _CLASSES[label]
    obj = _sample_object(rng, n, ("small", "large")[rng.integers(2)], colour, shape)
    return _render(rng, [_place_anywhere(rng, obj, n)], n)[0]


def _save_jpeg(image: Image.Image, path: Path) -> None:
    # 4:4:4 keeps the object colours from bleeding into the background at 64 px.
    image.save(path, format="JPEG", quality=95, subsampling=0, optimize=False, progressive=False)


def _write_dataset(root: Path, spec: ShapesSpec, progress: bool) -> None:
    total = spec.train_size + len(_CLASSES) * spec.zeroshot_per_class
    disable = not progress or os.environ.get("CI") == "true"
    with tqdm(total=total, desc="shapes dataset", unit="img", disable=disable) as bar:
        (root / "train").mkdir(parents=True)
        for i in range(spec.train_size):
            image, captions = _train_sample(spec, i)
            _save_jpeg(image, root / "train" / f"{i:06d}.jpg")
            (root / "train" / f"{i:06d}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8", newline="\n")
            bar.update()
        for label, (colour, shape) in enumerate(_CLASSES):
            folder = root / "zeroshot" / f"{colour}_{shape}"
            folder.mkdir(parents=True)
            for i in range(spec.zeroshot_per_class):
                _save_jpeg(_zeroshot_image(spec, label, i), folder / f"{i:04d}.jpg")
                bar.update()
    names = "".join(f"{colour} {shape}\n" for colour, shape in _CLASSES)
    (root / "classnames.txt").write_text(names, encoding="utf-8", newline="\n")
    (root / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES), encoding="utf-8", newline="\n")
    # Last: its presence is what marks the dataset complete.
    (root / "spec.json").write_text(json.dumps(_spec_record(spec), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _spec_record(spec: ShapesSpec) -> dict[str, int]:
    return {**asdict(spec), "format": FORMAT}


def _is_complete(out_dir: Path, spec: ShapesSpec) -> bool:
    try:
        return json.loads((out_dir / "spec.json").read_text(encoding="utf-8")) == _spec_record(spec)
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Serialise generators of one out_dir (e.g. every rank of a launch) through a sibling lock file."""
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def generate(out_dir: str | Path, spec: ShapesSpec = ShapesSpec(), *, progress: bool = True) -> Path:
    """Generate (or reuse if already complete with the same spec) the dataset under out_dir; return out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        if _is_complete(out_dir, spec):
            return out_dir
        # Never wipe a directory that is not ours (a mistyped --out pointing at real data).
        if out_dir.exists() and not (out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= _DATASET_ENTRIES):
            raise FileExistsError(f"{out_dir} exists and is not a shapes dataset; refusing to replace it")
        # Under the lock, any temp dir left is from an interrupted run.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        try:
            _write_dataset(tmp, spec, progress)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
