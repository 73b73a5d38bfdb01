"""`slip export` and plain weights: a run's checkpoint reloads, without DeepSpeed, bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from slip import main as cli
from trainer import weights as export_mod
from trainer.build import init_model
from trainer.checkpoint import export_run
from trainer.checksums import write_manifest
from trainer.config import load_config
from trainer.weights import load_model, read_weights, write_weights

TAG = "step-00000004"


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny_cpu", ["model.objective=slip"])


@pytest.fixture(scope="module")
def trained(cfg):
    """A tiny SLIP whose every parameter and BatchNorm statistic differs from its init."""
    model = init_model(cfg)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)  # a variance is positive
            elif name.endswith("num_batches_tracked"):
                buf.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model.eval()


def _make_run(root: Path, cfg, state, *, config=None) -> Path:
    """The layout a training run leaves: config.yaml, checkpoints/latest and one complete checkpoint."""
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ckpt = run / "checkpoints" / TAG
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "world": 1}))  # trainer.checkpoint's completeness mark
    write_weights(state, ckpt / "model.safetensors", config if config is not None else cfg.to_dict())
    write_manifest(ckpt)
    (run / "checkpoints" / "latest").write_text(TAG + "\n")
    return run


def _inputs(cfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    s = cfg.augment.image_size
    return {
        "image": torch.randn(4, 3, s, s, generator=g),  # (4, 3, 64, 64)
        "aug1": torch.randn(4, 3, s, s, generator=g),
        "aug2": torch.randn(4, 3, s, s, generator=g),
        "text": torch.randint(0, cfg.model.vocab_size, (4, cfg.model.context_length), generator=g),  # (4, 77)
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_export_reloads_bitwise(tmp_path, cfg, trained, capsys):
    run = _make_run(tmp_path, cfg, trained.state_dict())
    out = tmp_path / "export" / "tiny.safetensors"
    assert export_run(run, out) == out

    state, config = read_weights(out)
    assert config == yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    expected = trained.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k

    rng_before = torch.get_rng_state()
    reloaded = load_model(out)
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading does not reseed the caller
    assert not reloaded.training

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    batch = _inputs(cfg, g)
    with torch.no_grad():
        want = trained(**batch)
        got = reloaded(**batch)
    assert want.keys() == got.keys() == {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"}
    for k in want:
        assert torch.equal(got[k], want[k]), k

    cli_out = tmp_path / "cli.safetensors"
    assert cli.main(["export", str(run), "--out", str(cli_out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    values = sum(v.numel() for v in expected.values())
    assert printed == [f"wrote {cli_out}: {len(expected)} tensors, {values:,} parameters and buffers"]
    cli_state, _ = read_weights(cli_out)
    assert all(torch.equal(cli_state[k], v) for k, v in expected.items())


def test_write_weights_copies_views_and_shared_storage(tmp_path):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    base = torch.randn(5, 7, generator=g)
    state = {"a": base, "tied": base, "transposed": base.T, "slice": base[1:3], "ints": torch.randint(-9, 9, (3,), generator=g)}
    path = tmp_path / "w.safetensors"
    write_weights(state, path, {"k": [1, 2.5, "x"]})
    got, config = read_weights(path)
    assert config == {"k": [1, 2.5, "x"]}
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k
    assert _leftovers(tmp_path) == ["w.safetensors"]


def test_write_weights_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    old = {"w": torch.randn(3)}
    write_weights(old, path, {"v": 1})

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(os.urandom(64))
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_weights({"w": torch.randn(3)}, path, {"v": 2})
    assert _leftovers(tmp_path) == ["w.safetensors"]
    state, config = read_weights(path)
    assert torch.equal(state["w"], old["w"]) and config == {"v": 1}

    with pytest.raises(TypeError):  # not JSON: fails before any file is made
        write_weights({"w": torch.randn(3)}, tmp_path / "new.safetensors", {"v": object()})
    assert _leftovers(tmp_path) == ["w.safetensors"]


def test_read_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_weights(missing)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: not a readable safetensors file") as err:
        read_weights(corrupt)
    assert "\n" not in str(err.value)

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(foreign))  # valid safetensors, not ours
    with pytest.raises(ValueError, match=r"foreign\.safetensors: not slipstream weights"):
        read_weights(foreign)


def _assert_cli_fails(capsys, run: Path, out: Path, names: str) -> None:
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slip: error: ") and names in err[0], err
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_export_errors(tmp_path, cfg, capsys):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    state = {"w": torch.randn(4, generator=g)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.safetensors"

    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match="no-such-run"):
        export_run(missing, out)
    _assert_cli_fails(capsys, missing, out, str(missing))

    run = _make_run(tmp_path / "a", cfg, state)
    ckpts = run / "checkpoints"
    for p in sorted(ckpts.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    ckpts.rmdir()
    with pytest.raises(ValueError, match=str(run)):
        export_run(run, out)
    _assert_cli_fails(capsys, run, out, str(run))

    run = _make_run(tmp_path / "b", cfg, state)
    (run / "checkpoints" / "latest").write_text("step-00000099\n")  # a pointer to nothing: the older one is used, and said
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "checkpoints" / "latest") in err[0] and err[0].endswith(TAG), err
    out.unlink()

    run = _make_run(tmp_path / "c", cfg, state)
    weights = run / "checkpoints" / TAG / "model.safetensors"
    weights.write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match=str(weights)):
        export_run(run, out)
    _assert_cli_fails(capsys, run, out, str(weights))


def test_load_model_names_a_missing_key(tmp_path, cfg, trained):
    state = dict(trained.state_dict())
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    names = sorted(state)
    dropped = names[int(torch.randint(len(names), (), generator=g))]
    del state[dropped]
    path = tmp_path / "partial.safetensors"
    write_weights(state, path, cfg.to_dict())
    with pytest.raises(ValueError, match=r"partial\.safetensors: .*missing key '" + dropped.replace(".", r"\.") + "'") as err:
        load_model(path)
    assert "\n" not in str(err.value)

    extra = dict(trained.state_dict())
    extra["visual.stray"] = torch.randn(3, generator=g)
    write_weights(extra, path, cfg.to_dict())
    with pytest.raises(ValueError, match=r"unexpected key 'visual\.stray'"):
        load_model(path)


@pytest.mark.slow  # a fresh interpreter imports torch, timm and DALI: about 10 s
def test_load_model_needs_no_deepspeed(tmp_path, cfg, trained):
    """The point of the format: a fresh process where `import deepspeed` fails still loads the model."""
    path = tmp_path / "w.safetensors"
    write_weights(trained.state_dict(), path, cfg.to_dict())
    script = textwrap.dedent(
        f"""
        import sys

        class NoDeepSpeed:
            def find_spec(self, name, path=None, target=None):
                if name == "deepspeed" or name.startswith("deepspeed."):
                    raise ImportError("deepspeed is blocked in this test")

        sys.meta_path.insert(0, NoDeepSpeed())
        from trainer.weights import load_model

        model = load_model({str(path)!r})
        print(sum(p.numel() for p in model.parameters()))
        """
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == sum(p.numel() for p in trained.parameters())
