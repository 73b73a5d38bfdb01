"""GradCache: m micro-batches through DeepSpeed give exactly one step on the big batch.

The oracle is engine A, one plain step on the whole batch (task(engine, batch), backward,
step). Engine B, from the same weights, runs GradCache with gradient_accumulation_steps m.
With SGD without momentum the update is lr * grad, so equal parameters after the step mean
equal gradients; the SimCLR head's BatchNorm running statistics must be the big batch's.
A third engine accumulating plainly (each micro-batch against its own negatives) must NOT
match: that is the difference GradCache exists for, and it shows the comparison can fail.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from trainer.build import init_model  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.gradcache import GradCache  # noqa: E402
from trainer.models import SlipModel  # noqa: E402
from trainer.objectives import get_objective  # noqa: E402
from trainer.task import TrainingTask  # noqa: E402

B = 8  # local batch
LR = 0.1
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def dist_info():
    from trainer.engine import init_distributed, prebuild_cpu_comm_op

    prebuild_cpu_comm_op()  # cached in ~/.cache/torch_extensions after the first build
    return init_distributed("cpu")


def _cfg(objective: str):
    return load_config("tiny_cpu", [f"model.objective={objective}"])  # loss backend: chunked, the default


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 49406, (B, 77), generator=g)  # (B, 77)
    # Captions of different lengths, so the chunks' text towers truncate to different lengths.
    ends = torch.randint(3, 20, (B,), generator=g)  # (B,)
    for i, e in enumerate(ends.tolist()):
        text[i, e] = 49407
        text[i, e + 1 :] = 0
    views = {k: torch.randn(B, 3, 64, 64, generator=g) for k in ("image", "aug1", "aug2")}  # (B, 3, 64, 64) each
    return {**views, "text": text, "index": torch.arange(B)}


def _ds_config(micro_batches: int, zero_stage: int) -> dict[str, Any]:
    # The shape of trainer.engine.deepspeed_config, one rank, with accumulation.
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        zero.update(overlap_comm=False, contiguous_gradients=True)  # as on the CPU
    return {
        "train_batch_size": B,
        "train_micro_batch_size_per_gpu": B // micro_batches,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # plain SGD: the update is exactly lr * grad
        "torch_autocast": {"enabled": False, "dtype": "bfloat16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


_ENGINES: list[Any] = []


@pytest.fixture(autouse=True)
def _destroy_engines():
    """DeepSpeed engines hold their optimizer and ZeRO buffers until destroyed; dozens of them
    left alive grow this test process by gigabytes and make later tests' forks fail."""
    linear = torch.nn.functional.linear  # ZeRO-3 replaces it for the rest of the process
    yield
    while _ENGINES:
        engine = _ENGINES.pop()
        engine.destroy()
        engine.optimizer = None
    torch.nn.functional.linear = linear


def _engine(objective: str, micro_batches: int, zero_stage: int) -> Any:
    from trainer.engine import build_engine

    model = init_model(_cfg(objective))  # seeded: every engine starts from the same weights
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    engine = build_engine(model, optimizer, _ds_config(micro_batches, zero_stage))
    _ENGINES.append(engine)
    return engine


def _state(engine: Any) -> dict[str, torch.Tensor]:
    """Full parameters (gathered under ZeRO-3) and buffers, copied."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        state = {n: p.detach().clone() for n, p in module.named_parameters()}
    state.update({n: b.detach().clone() for n, b in module.named_buffers()})
    return state


def _plain_step(engine: Any, task: TrainingTask, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    losses = task(engine, batch)
    engine.backward(losses["loss"])
    engine.step()
    return {k: v.detach() for k, v in losses.items()}


def _assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("objective", ["slip", "clip", "simclr"])
def test_gradcache_step_equals_one_big_batch_step(dist_info, objective: str, zero_stage: int) -> None:
    task = TrainingTask(get_objective(objective), _cfg(objective).loss)
    batch = _batch()

    oracle = _engine(objective, 1, zero_stage)
    before = _state(oracle)
    want_losses = _plain_step(oracle, task, batch)
    want = _state(oracle)
    # The step moved the weights (and the BN running statistics), or the comparison is empty.
    assert _max_diff(want, before) > 1e-3

    for micro_batches in (1, 2, 4):
        engine = _engine(objective, micro_batches, zero_stage)
        cache = GradCache(task, micro_batches)
        losses = cache.loss(engine, batch)
        assert losses.keys() == want_losses.keys()
        for k in want_losses:
            torch.testing.assert_close(losses[k], want_losses[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
        cache.backward_and_step(engine)
        assert engine.global_steps == 1  # m backward/step pairs, one optimizer update
        _assert_states_close(_state(engine), want)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_gradcache_with_checkpointed_towers(dist_info, zero_stage: int) -> None:
    """Phase 3 re-runs the towers with activation checkpointing on: still the big-batch step."""
    objective = "slip"
    task = TrainingTask(get_objective(objective), _cfg(objective).loss)
    batch = _batch()
    oracle = _engine(objective, 1, zero_stage)
    _plain_step(oracle, task, batch)
    engine = _engine(objective, 2, zero_stage)
    engine.module.set_grad_checkpointing(True)
    cache = GradCache(task, 2)
    cache.loss(engine, batch)
    cache.backward_and_step(engine)
    _assert_states_close(_state(engine), _state(oracle))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_plain_accumulation_does_not_match(dist_info, zero_stage: int) -> None:
    """Each micro-batch against only its own negatives (and BN statistics of b/m rows) is a
    different step: the parity test above would catch GradCache degrading into this."""
    objective = "slip"
    task = TrainingTask(get_objective(objective), _cfg(objective).loss)
    batch = _batch()
    oracle = _engine(objective, 1, zero_stage)
    _plain_step(oracle, task, batch)
    want = _state(oracle)

    m = 4
    engine = _engine(objective, m, zero_stage)
    size = B // m
    for i in range(m):
        _plain_step(engine, task, {k: v[i * size : (i + 1) * size] for k, v in batch.items()})
    assert engine.global_steps == 1
    got = _state(engine)
    # The parameters themselves differ (not only BatchNorm's batch counter), far beyond tolerance.
    params = [n for n, _ in engine.module.named_parameters()]
    assert _max_diff({n: got[n] for n in params}, {n: want[n] for n in params}) > 1e-4
    with pytest.raises(AssertionError):
        _assert_states_close(got, want)


def _model(objective: str) -> SlipModel:
    return init_model(_cfg(objective))


@pytest.mark.parametrize("objective", ["slip", "clip", "simclr"])
def test_stages_compose_to_the_full_forward_bitwise(objective: str) -> None:
    model = _model(objective)
    task = TrainingTask(get_objective(objective), _cfg(objective).loss)
    inputs = task.model_inputs(_batch())
    full = model(**inputs)
    features = model(**inputs, stage="towers")
    expected = {"slip": {"image", "aug1", "aug2", "text"}, "clip": {"image", "text"}, "simclr": {"aug1", "aug2"}}
    assert set(features) == expected[objective]
    staged = model(stage="heads", features=features)
    assert staged.keys() == full.keys()
    for k in full:
        assert torch.equal(staged[k], full[k]), k
    losses, split = task(model, _batch()), task.heads_and_loss(model, task.towers(model, _batch()))
    for k in losses:
        assert torch.equal(losses[k], split[k]), k


def test_stage_errors() -> None:
    model = _model("clip")
    with pytest.raises(ValueError, match="unknown stage"):
        model(stage="tower")
    with pytest.raises(ValueError, match="features="):
        model(stage="heads")


def test_gradcache_refuses_bad_use() -> None:
    objective = "clip"
    task = TrainingTask(get_objective(objective), _cfg(objective).loss)
    model = _model(objective)
    with pytest.raises(ValueError, match="not divisible"):
        GradCache(task, 3).loss(model, _batch())
    with pytest.raises(ValueError, match="at least 1"):
        GradCache(task, 0)
    cache = GradCache(task, 2)
    with pytest.raises(RuntimeError, match="without a preceding"):
        cache.backward_and_step(None)
    cache.loss(model, _batch())
    with pytest.raises(RuntimeError, match="called twice"):
        cache.loss(model, _batch())
    cache.discard()
    cache.loss(model, _batch())  # usable again after a skipped step


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-rank gloo run: GradCache vs a plain step on the local half of the batch."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    from trainer.engine import build_engine, init_distributed, parallelize

    dist = init_distributed("cpu")
    task = TrainingTask(get_objective("slip"), _cfg("slip").loss, dist.group)
    local = B // world
    batch = {k: v[rank * local : (rank + 1) * local] for k, v in _batch().items()}  # this rank's rows

    def engine(micro_batches: int, zero_stage: int) -> Any:
        # Cross-rank BatchNorm, as the trainer builds it: the big batch's statistics span both ranks.
        model = parallelize(init_model(_cfg("slip")), dist)
        config = _ds_config(micro_batches, zero_stage)
        config.update(train_micro_batch_size_per_gpu=local // micro_batches)  # train_batch_size stays B, over 2 ranks
        return build_engine(model, torch.optim.SGD(model.parameters(), lr=LR), config)

    diffs = {}
    for zero_stage in (0, 2, 3):
        oracle = engine(1, zero_stage)
        _plain_step(oracle, task, batch)
        want = _state(oracle)
        gradcache = engine(2, zero_stage)
        cache = GradCache(task, 2)
        cache.loss(gradcache, batch)
        cache.backward_and_step(gradcache)
        got = _state(gradcache)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"stage {zero_stage} {name}: {m}")
        diffs[zero_stage] = _max_diff(got, want)
    torch.save(diffs, os.path.join(out, f"rank_{rank}.pt"))


@pytest.mark.slow
@pytest.mark.distributed
def test_gradcache_on_two_ranks_equals_the_global_batch_step(tmp_path) -> None:
    """Across ranks the loss gathers all embeddings and BatchNorm reduces its statistics: the
    GradCache step still equals the plain big-batch step (ZeRO 0, 2, 3)."""
    from ranks import free_port, spawn_ranks

    spawn_ranks(_two_rank_worker, 2, (2, free_port(), str(tmp_path)), timeout_s=300, what="the 2-rank GradCache run")
    for rank in range(2):
        diffs = torch.load(tmp_path / f"rank_{rank}.pt")
        assert set(diffs) == {0, 2, 3} and max(diffs.values()) < 1e-5, diffs
