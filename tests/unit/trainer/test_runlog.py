"""The run logger: JSON lines and TensorBoard scalars that a resumed run continues without doubling."""
import json
import random
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.runlog import RunLogger


def _log(run: Path, steps: range, start: int, values: dict[int, float]) -> None:
    logger = RunLogger(run, start_step=start)
    for step in steps:
        logger.write({"step": step, "loss": values[step], "lr": 1e-3, "note": "text is not a scalar"})
    logger.close()


def _tensorboard(run: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return sorted((e.step, e.value) for e in acc.Scalars("loss"))


def test_a_resumed_run_replaces_what_the_dead_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(5)
    first = {s: rng.uniform(1, 9) for s in range(10)}
    second = {s: rng.uniform(1, 9) for s in range(10)}
    _log(tmp_path, range(0, 7), 0, first)  # died at step 6, last checkpoint at step 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # the record the kill cut short
    _log(tmp_path, range(4, 10), 4, second)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [first[s] for s in range(4)] + [second[s] for s in range(4, 10)]
    assert [r["step"] for r in records] == list(range(10)) and [r["loss"] for r in records] == want
    got = _tensorboard(tmp_path)
    assert [s for s, _ in got] == list(range(10))
    assert all(abs(v - w) < 1e-5 for (_, v), w in zip(got, want))


def test_a_fresh_run_in_the_same_directory_starts_new_files(tmp_path: Path) -> None:
    rng = random.Random(6)
    old = {s: rng.uniform(1, 9) for s in range(5)}
    new = {s: rng.uniform(1, 9) for s in range(3)}
    _log(tmp_path, range(5), 0, old)
    _log(tmp_path, range(3), 0, new)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [new[s] for s in range(3)]
    assert [s for s, _ in _tensorboard(tmp_path)] == [0, 1, 2]


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path / "run", enabled=False)
    logger.write({"step": 0, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


class _FakeWandb:
    """Stands in for the wandb package (not a dependency): records what the logger asks of it."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values: dict, step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_gets_the_scalars_and_a_resume_rewinds_to_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = RunLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p", config={"run": {"seed": 1}})
    logger.write({"step": 0, "loss": 2.5, "note": "x"})
    logger.close()
    run_id = (tmp_path / "wandb_id").read_text()
    assert fake.inits[0]["id"] == run_id and fake.inits[0]["project"] == "p"
    assert fake.logged == [({"loss": 2.5}, 0)] and fake.finished == 1

    RunLogger(tmp_path, start_step=7, tensorboard=False, wandb=True).close()
    assert fake.inits[1]["resume_from"] == f"{run_id}?_step=7"  # W&B would drop steps below its last one
    RunLogger(tmp_path, tensorboard=False, wandb=True).close()
    assert fake.inits[2]["id"] != run_id  # a fresh run in the same directory is a new W&B run
