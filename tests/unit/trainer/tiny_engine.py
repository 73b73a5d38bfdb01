"""A stand-in for DeepSpeed's engine with what CheckpointManager asks of it, for tests that save
and resume without building one (a real engine's are in tests/integration)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class TinyEngine:
    class Loader:
        def load(self, path: str, map_location: Any = None) -> Any:
            return torch.load(path, map_location=map_location, weights_only=True)

    def __init__(self, rank: int = 0) -> None:
        self.rank, self.module, self.checkpoint_engine = rank, torch.nn.Linear(5, 3), self.Loader()

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool = True) -> None:
        d = Path(directory) / tag
        if self.rank == 0:  # as DeepSpeed: the model states from rank 0, optimizer partitions from each
            torch.save({"module": self.module.state_dict()}, d / "mp_rank_00_model_states.pt")
        torch.save({"moments": torch.randn(7)}, d / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, directory: str, tag: str, load_lr_scheduler_states: bool = True) -> tuple[str, dict]:
        path = Path(directory) / tag / "mp_rank_00_model_states.pt"
        self.module.load_state_dict(self.checkpoint_engine.load(str(path), map_location="cpu")["module"])
        return str(path), {}
