"""The config tree: defaults <- recipe <- overrides, and every kind of bad config."""
from pathlib import Path

import pytest
import yaml

from trainer.config import Config, check_registered_names, load_config
from trainer.launch import local_batch
from trainer.recipe import CONFIG_DIR, ConfigError

PAPER_RECIPES = {
    # name: (size, objective, lr, weight decay)
    "slip_vits16": ("vits16", "slip", 3e-3, 0.1),
    "slip_vitb16": ("vitb16", "slip", 3e-3, 0.1),
    "slip_vitl16": ("vitl16", "slip", 3e-3, 0.1),
    "clip_vitb16": ("vitb16", "clip", 5e-4, 0.5),
    "simclr_vitb16": ("vitb16", "simclr", 3.2e-3, 0.1),
}


def test_defaults_without_recipe() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optim.betas == (0.9, 0.98)


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes_match_the_paper(name: str) -> None:
    size, objective, lr, wd = PAPER_RECIPES[name]
    cfg = load_config(name)
    assert (cfg.model.size, cfg.model.objective) == (size, objective)
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.weight_decay == pytest.approx(wd)
    assert cfg.data.batch_size == 4096
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (25, 1)
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == pytest.approx(1e-8)
    assert (cfg.loss.ssl_scale, cfg.loss.ssl_temp) == (1.0, pytest.approx(0.1))
    assert (cfg.model.ssl_mlp_dim, cfg.model.ssl_emb_dim) == (4096, 256)


def test_every_recipe_in_configs_loads() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "tiny_cpu" in names and set(PAPER_RECIPES) <= set(names)
    for name in names:
        load_config(name)


def test_the_fast_recipe_is_the_papers_plus_the_levers_only() -> None:
    from trainer.levers import check_levers, sizes_at

    paper, fast = load_config("slip_vitb16").to_dict(), load_config("slip_vitb16_fast").to_dict()
    changed = {(section, key) for section in paper for key in paper[section] if paper[section][key] != fast[section][key]}
    assert changed == {("augment", "ssl_image_size"), ("augment", "resolution_start"), ("augment", "resolution_ramp"),
                       ("model", "patch_dropout"), ("schedule", "unmasked_steps"), ("run", "name")}  # fmt: skip
    cfg = load_config("slip_vitb16_fast")
    check_levers(cfg)
    assert [sizes_at(cfg, epoch, 1) for epoch in (0, 2, 11, 20, 24)] == [(160, 96), (160, 96), (192, 128), (224, 160), (224, 160)]


def test_recipe_by_path_and_overrides_win(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"lr": 0.5}, "data": {"batch_size": 64}}))
    cfg = load_config(str(recipe), ["optim.lr=0.25", "optim.betas=[0.8, 0.9]", "run.seed=3"])
    assert cfg.optim.lr == 0.25  # override beats recipe
    assert cfg.data.batch_size == 64  # recipe beats default
    assert cfg.optim.weight_decay == 0.1  # default kept
    assert cfg.optim.betas == (0.8, 0.9) and cfg.run.seed == 3


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="data.batch_size must be an integer"):
        load_config(None, ["data.batch_size=1.5"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["optim.lr=0.01"])
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


BAD = [
    # (overrides, message fragment)
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["optimizer.lr=1"], "unknown section 'optimizer'"),
    (["optim.lr=fast"], "optim.lr must be a number"),
    (["optim.lr=true"], "optim.lr must be a number"),
    (["run.name=[1]"], "run.name must be a string"),
    (["run.seed=yes"], "run.seed must be an integer"),
    (["optim.betas=[0.9]"], "optim.betas must have 2 items"),
    (["optim.betas=0.9"], "optim.betas must be a list"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["data.batch_size=0"], "data.batch_size must be positive"),
    (["engine.zero_stage=4"], "engine.zero_stage must be 0-3"),
    (["engine.precision=fp8"], "engine.precision must be fp32 or bf16"),
    (["augment.jitter_p=1.5"], "augment.jitter_p is a probability"),
    (["augment.clip_scale=[0.9, 0.5]"], "augment.clip_scale must be an increasing"),
    (["augment.jitter=[0.4, 0.4, 0.4, 0.6]"], "hue <= 0.5"),
    (["augment.jitter=[-0.1, 0.4, 0.4, 0.1]"], "each >= 0"),
    (["data.source_workers=-1"], "data.source_workers must be 0 or more"),
    (["optim.name=sgd"], "optim.name must be one of"),
    (["lr=1"], "must look like section.key=value"),
    (["optim.lr"], "must look like section.key=value"),
]


@pytest.mark.parametrize("overrides,fragment", BAD)
def test_bad_overrides_name_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message and message.startswith("config:")


def test_bad_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*tiny_cpu"):
        load_config("nope")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(listy))
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.weight_decy' \(in .*typo.yaml\)"):
        load_config(str(typo))


def test_yaml_is_parsed_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("run:\n  name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(evil))


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("model.size=vitz16", "model.size 'vitz16' is not one of: "),
        ("model.objective=byol", "model.objective 'byol' is not one of: "),
        ("loss.backend=cuda_magic", "loss.backend 'cuda_magic' is not one of: reference"),
        ("run.log_every=0", "run.log_every must be positive"),
        ("run.name=a/b", "run.name must be a non-empty name"),
        ("schedule.end_lr=-1", "schedule.start_lr and schedule.end_lr must be non-negative"),
    ],
)
def test_names_and_values_checked_before_anything_runs(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config("tiny_cpu", [override])


def test_a_config_written_with_data_zeroshot_still_loads(tmp_path: Path) -> None:
    """Runs configured before zero-shot data had one key wrote `data.zeroshot` into config.yaml."""
    from trainer.config import config_from_dict

    saved = Config().to_dict()
    saved["data"]["zeroshot"] = "/data/zs"
    assert config_from_dict(saved).eval.zeroshot == "/data/zs"
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  zeroshot: /data/zs\neval:\n  zeroshot: /data/other\n")
    assert load_config(str(recipe)).eval.zeroshot == "/data/other"  # the newer key wins where both are set
    assert load_config(str(recipe), ["eval.zeroshot="]).eval.zeroshot == "/data/zs"


def test_a_mistake_names_where_it_was_made(tmp_path: Path) -> None:
    """A key set on the command line is blamed on the command line, one set in a file on the file."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("data:\n  batch_size: 8\n  thraeds: 2\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", ["data.bogus=1"])
    assert str(err.value) == "config: unknown key 'data.bogus' (from the command line: data.bogus=1)"
    with pytest.raises(ConfigError, match=r"unknown section 'dat' \(from the command line: dat.threads=2\)"):
        load_config("tiny_cpu", ["dat.threads=2"])
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    assert str(err.value) == f"config: unknown key 'data.thraeds' (in {recipe}); did you mean 'data.threads'?"
    recipe.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    assert str(err.value) == f"config: optim.lr must be a number, got 'fast' (in {recipe})"
    # The command line's value replaces the file's, and with it the blame.
    with pytest.raises(ConfigError, match=r"optim.lr must be a number, got 'slow' \(from the command line: optim.lr=slow\)"):
        load_config(str(recipe), ["optim.lr=slow"])
    assert load_config(str(recipe), ["optim.lr=0.5"]).optim.lr == 0.5


def test_registered_names_can_be_checked_last() -> None:
    cfg = load_config("tiny_cpu", ["model.size=vitz16"], names=False)
    with pytest.raises(ConfigError, match="model.size 'vitz16' is not one of"):
        check_registered_names(cfg)


@pytest.mark.parametrize(
    "batch,world,micro,fragment",
    [(15, 2, 1, "data.batch_size 15 is not divisible by 2 ranks"), (12, 2, 4, "the local batch 6 (12 over 2 ranks) is not divisible by engine.micro_batches 4")],
)
def test_a_batch_that_does_not_split_is_a_config_error(batch: int, world: int, micro: int, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        local_batch(batch, world, micro)
    assert fragment in str(err.value)
    assert local_batch(24, 3, 4) == 8
