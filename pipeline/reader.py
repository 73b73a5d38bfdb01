"""Memory-mapped access to a converted dataset: every sample's JPEG bytes, tokens and text.

Shards are opened with FFCV's own header/metadata reader, then memory-mapped once; a
sample's JPEG is a zero-copy view into the map. A missing, truncated or foreign shard is
a DatasetError naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from numba import njit

from pipeline.ffcv_compat import HeaderType, Reader
from pipeline.schema import FIELD_NAMES, DatasetError, read_manifest
from pipeline.sources import SourceError
from pipeline.sources.classes import labels_from_ids


@njit(cache=True, nogil=True)
def _allocation_sizes(sample_id: np.ndarray, ptr: np.ndarray, size: np.ndarray, wanted_ptr: np.ndarray) -> np.ndarray:
    """int64 [n]: the size of the allocation starting at wanted_ptr[i] among sample i's rows,
    -1 where there is none. One pass over FFCV's allocation table (3 rows per sample here)."""
    out = np.full(len(wanted_ptr), -1, dtype=np.int64)
    for row in range(len(sample_id)):
        i = sample_id[row]
        if i < len(wanted_ptr) and ptr[row] == wanted_ptr[i]:
            out[i] = size[row]
    return out


class _Shard:
    def __init__(self, path: Path, expected_samples: int, captions_per_image: int, context_length: int) -> None:
        if not path.is_file():
            raise DatasetError(f"{path}: no such shard")
        size = path.stat().st_size
        if size < HeaderType.itemsize:
            raise DatasetError(f"{path}: truncated .beton ({size} bytes)")
        header = np.fromfile(path, dtype=HeaderType, count=1)[0]
        if header["alloc_table_ptr"] > size:
            raise DatasetError(f"{path}: truncated .beton (allocation table at byte {header['alloc_table_ptr']}, file has {size})")
        try:
            reader = Reader(str(path))
        except Exception as err:  # FFCV raises AssertionError/ValueError/IndexError on foreign bytes
            raise DatasetError(f"{path}: not a readable .beton ({type(err).__name__})") from None
        if tuple(reader.field_names) != FIELD_NAMES:
            raise DatasetError(f"{path}: fields {reader.field_names}, expected schema v1 {list(FIELD_NAMES)}")
        if reader.num_samples != expected_samples:
            raise DatasetError(f"{path}: {reader.num_samples} samples, manifest says {expected_samples}")
        table = reader.alloc_table
        ends = table["ptr"] + table["size"] if len(table) else np.zeros(0, dtype=np.uint64)
        if len(ends) and int(ends.max()) > size:
            raise DatasetError(f"{path}: truncated .beton (data runs past the end of the file)")
        if len(table) != 3 * expected_samples:  # image, tokens and text allocate once per sample
            raise DatasetError(f"{path}: truncated .beton (allocation table has {len(table)} entries)")

        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        meta = reader.metadata
        self.image_hw = np.stack([meta["f0"]["height"], meta["f0"]["width"]], axis=1).astype(np.int64)  # (n, 2)
        self.uid = meta["f3"].astype(np.int64)
        self.image_ptr = meta["f0"]["data_ptr"].astype(np.int64)
        self.image_size = _allocation_sizes(
            table["sample_id"].astype(np.int64), table["ptr"].astype(np.int64), table["size"].astype(np.int64), self.image_ptr
        )
        if (self.image_size < 0).any():
            missing = int(np.flatnonzero(self.image_size < 0)[0])
            raise DatasetError(f"{path}: sample {missing} has no image allocation (a damaged .beton)")
        self.tokens_ptr = meta["f1"].astype(np.int64)
        self.n_captions = meta["f2"].astype(np.int64)
        self.text_ptr = meta["f4"]["ptr"].astype(np.int64)
        self.text_size = meta["f4"]["size"].astype(np.int64)
        self.token_bytes = captions_per_image * context_length * 4
        self.token_shape = (captions_per_image, context_length)


class BetonDataset:
    """All shards of one converted dataset, indexed 0..len-1 in manifest order."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        k, ctx = self.manifest["captions_per_image"], self.manifest["context_length"]
        self.shards = [_Shard(self.directory / s["file"], s["samples"], k, ctx) for s in self.manifest["shards"]]
        counts = np.array([len(s.image_ptr) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # shard i holds [offsets[i], offsets[i+1])
        self.n_captions = np.concatenate([s.n_captions for s in self.shards])  # (n,)
        if len(self) != self.manifest["samples"]:
            raise DatasetError(f"{self.directory}: shards hold {len(self)} samples, manifest says {self.manifest['samples']}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __reduce__(self) -> tuple:
        # Pickled (for DALI's source worker processes) as its path, not as its memory maps.
        return (BetonDataset, (str(self.directory),))

    def shard_path(self, index: int) -> Path:
        return self._locate(index)[0].path

    def _locate(self, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard], index - int(self.offsets[shard])

    def jpeg(self, index: int) -> np.ndarray:
        """uint8 [n_bytes]: a view into the memory map, not a copy."""
        shard, i = self._locate(index)
        start = shard.image_ptr[i]
        return shard.data[start : start + shard.image_size[i]]

    def tokens(self, index: int) -> np.ndarray:
        """int32 [K, 77]; rows past n_captions are zeros."""
        shard, i = self._locate(index)
        start = shard.tokens_ptr[i]
        return shard.data[start : start + shard.token_bytes].view(np.int32).reshape(shard.token_shape)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) as recorded in the shard's metadata."""
        shard, i = self._locate(index)
        return int(shard.image_hw[i, 0]), int(shard.image_hw[i, 1])

    def uid_field(self, index: int) -> int:
        shard, i = self._locate(index)
        return int(shard.uid[i])

    def captions(self, index: int) -> list[str]:
        shard, i = self._locate(index)
        start = shard.text_ptr[i]
        return bytes(shard.data[start : start + shard.text_size[i]]).decode("utf-8").split("\n")

    def ids(self) -> list[str]:
        """Every sample's source id, in index order (the `uid` field indexes this list)."""
        out: list[str] = []
        for shard in self.manifest["shards"]:
            lines = (self.directory / shard["ids"]).read_text(encoding="utf-8").splitlines()
            out.extend(json.loads(line) for line in lines)
        return out

    @property
    def classes(self) -> list[str] | None:
        """The class list of a labelled dataset (`slip convert classes`), else None."""
        return self.manifest.get("classes")

    def labels(self) -> np.ndarray:
        """int64 [n]: each sample's class index, read from its id `<class>/<stem>`."""
        if self.classes is None:
            raise DatasetError(f"{self.directory}: has no labels; convert a class-per-folder tree with `slip convert classes`")
        try:
            return np.asarray(labels_from_ids(self.ids(), self.classes), dtype=np.int64)
        except SourceError as err:
            raise DatasetError(f"{self.directory}: {err}") from None

    @property
    def nbytes(self) -> int:
        return sum(os.path.getsize(s.path) for s in self.shards)
