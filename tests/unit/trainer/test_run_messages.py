"""What a run tells its user: refusals that name a way out that works, one message for a
directory that is not a run, warnings above the progress bar, exported files that honour the umask."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from slip import main as cli
from trainer.checkpoint import check_resumable, export_run, run_checkpoints
from trainer.config import load_config


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny_cpu", ["data.batch_size=16"])


def _meta(cfg, world: int = 1, **changes) -> dict:
    saved = cfg.to_dict()
    for key, value in changes.items():
        section, name = key.split("__")
        saved[section][name] = value
    return {"config": saved, "world": world, "step": 4}


def test_a_changed_batch_size_names_the_saved_value_and_a_new_run(cfg, tmp_path: Path) -> None:
    where = tmp_path / "run" / "checkpoints" / "step-00000004"
    saved = 16 * (2 + int.from_bytes(os.urandom(1), "little") % 8)
    with pytest.raises(ValueError) as err:
        check_resumable(cfg, 1, _meta(cfg, data__batch_size=saved), where)
    message = str(err.value)
    assert "\n" not in message and f"data.batch_size is 16 but {saved} in the checkpoint {where}" in message
    assert f"set data.batch_size={saved} to resume" in message and "run.name" in message and f"remove {where.parent}" in message
    assert "run.resume=false" not in message  # it refuses a directory with checkpoints: not a way out
    # The first way out: the checkpoint's value resumes.
    check_resumable(load_config("tiny_cpu", [f"data.batch_size={saved}"]), 1, _meta(cfg, data__batch_size=saved), where)


def test_a_changed_model_names_the_key_that_differs(cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.embed_dim is 128 but 64 in the checkpoint .*set model\.embed_dim=64 to resume"):
        check_resumable(cfg, 1, _meta(cfg, model__embed_dim=64), tmp_path / "c" / "step-00000001")
    check_resumable(load_config("tiny_cpu", ["data.batch_size=16", "model.embed_dim=64"]), 1, _meta(cfg, model__embed_dim=64), tmp_path)
    with pytest.raises(ValueError, match=r"data\.loader is dali but synthetic in the checkpoint .*set data\.loader=synthetic"):
        check_resumable(cfg, 1, _meta(cfg, data__loader="synthetic"), tmp_path / "c" / "step-00000001")


def test_zero_on_another_number_of_ranks_names_the_number_to_resume_on(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["data.batch_size=16", "engine.zero_stage=2"])
    with pytest.raises(ValueError, match=r"written by 4 ranks, resumed on 2; .*resume on 4 ranks, or give run\.name another name"):
        check_resumable(cfg, 2, _meta(cfg, world=4), tmp_path / "step-00000001")
    check_resumable(cfg, 4, _meta(cfg, world=4), tmp_path / "step-00000001")


def test_eval_and_export_describe_a_directory_that_is_not_a_run_in_the_same_line(tmp_path: Path, capsys) -> None:
    from slip.eval import open_model

    stray = tmp_path / "photos"
    stray.mkdir()
    (stray / "config.yaml").write_bytes(os.urandom(64))  # looks a little like a run: it is not one
    with pytest.raises(ValueError) as from_export:
        export_run(stray, tmp_path / "out.safetensors")
    with pytest.raises(ValueError) as from_eval:
        open_model(stray)
    with pytest.raises(ValueError) as from_function:
        run_checkpoints(stray)
    assert str(from_export.value) == str(from_eval.value) == str(from_function.value)
    assert str(from_export.value).startswith(f"{stray}: not a run directory (it has no checkpoints/)")

    capsys.readouterr()
    assert cli.main(["export", str(stray), "--out", str(tmp_path / "out.safetensors")]) == 2
    export_err = capsys.readouterr().err
    assert cli.main(["eval", "zeroshot", "--data", str(tmp_path), "--checkpoint", str(stray)]) == 2
    eval_err = capsys.readouterr().err
    assert export_err == eval_err == f"slip: error: {from_export.value}\n"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_exported_and_checkpointed_weights_honour_the_umask(cfg, tmp_path: Path, umask: int) -> None:
    from trainer.build import init_model
    from trainer.checksums import write_manifest
    from trainer.weights import write_weights

    previous = os.umask(umask)
    try:
        run = tmp_path / "run"
        ckpt = run / "checkpoints" / "step-00000001"
        ckpt.mkdir(parents=True)
        cfg.dump(run / "config.yaml")
        write_weights(init_model(cfg).state_dict(), ckpt / "model.safetensors", cfg.to_dict())  # as a checkpoint save does
        write_manifest(ckpt)
        out = export_run(run, tmp_path / "exported.safetensors")
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    for path in (ckpt / "model.safetensors", out, ckpt / "checksums.json"):
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


def test_a_warning_logged_while_the_bar_is_drawn_gets_a_line_of_its_own(capsys) -> None:
    from trainer.loop import progress_bar

    message = f"shard-00003.beton: sample {int.from_bytes(os.urandom(2), 'little')} is corrupt (truncated); replaced by sample 7"
    with progress_bar(4, 0, "train slip-tiny", quiet=False) as bar:
        bar.update(1)
        logging.getLogger("slipstream.loader").warning(message)
        bar.update(1)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if message in line]
    assert len(lines) == 1, err
    # tqdm redraws with carriage returns; what follows the last one is what the terminal shows.
    assert lines[0].split("\r")[-1] == message, repr(lines[0])
    assert "train slip-tiny" in err
