"""Evaluation during training: zero-shot (and retrieval) every `eval.every_epochs`, logged with the step's metrics.

Rank 0 evaluates the module the engine trains; the other ranks wait. Under ZeRO-3 every rank
takes part in gathering the partitioned weights first, so rank 0 sees the whole model.
"""
from __future__ import annotations

from typing import Any

import torch

from evaluation.prompts import read_lines, templates_option, zeroshot_classnames, zeroshot_templates
from evaluation.retrieval import eval_retrieval
from evaluation.zeroshot import eval_zeroshot
from pipeline.eval_view import labelled_images
from pipeline.reader import BetonDataset
from trainer.build import model_from_config
from trainer.config import Config
from trainer.dist import barrier
from trainer.engine import gathered_module
from trainer.models import SlipModel


class PeriodicEval:
    def __init__(self, cfg: Config, steps_per_epoch: int, total_steps: int, is_main: bool) -> None:
        e = cfg.eval
        self.cfg, self.is_main = cfg, is_main
        self.every = max(1, round(e.every_epochs * steps_per_epoch)) if e.every_epochs > 0 else 0
        self.total = total_steps
        self.zeroshot, self.retrieval = e.zeroshot, e.retrieval
        if self.every and not (self.zeroshot or self.retrieval):
            raise ValueError("config: eval.every_epochs is set but there is nothing to evaluate: set eval.zeroshot or eval.retrieval")
        self.classnames = self.templates = None
        if self.every and self.zeroshot:
            self.classnames, self.templates = self._prompts()
        if self.every and self.retrieval:
            BetonDataset(self.retrieval)  # a bad path fails now, not epochs into the run

    def _prompts(self) -> tuple[list[str], list[str]]:
        """The class names and templates, by evaluation's one rule (as `slip eval` picks them),
        resolved and checked against the data now: an evaluation failing epochs into a
        multi-rank run would leave the other ranks waiting at its barrier."""
        e = self.cfg.eval
        # eval.templates takes what --templates takes: a built-in set's name (clip80, slip7) or a file.
        names = read_lines(e.classnames) if e.classnames else None
        templates = templates_option(e.templates) if e.templates else None
        try:
            data = labelled_images(self.zeroshot)
            return zeroshot_classnames(data, names), zeroshot_templates(data, templates)
        except ValueError as err:
            raise ValueError(f"config: eval.zeroshot: {err}") from None

    def due(self, step: int) -> bool:
        """After `step` steps have run."""
        return bool(self.every) and (step % self.every == 0 or step == self.total)

    def run(self, engine: Any, world: int) -> dict[str, float]:
        """Collective: every rank calls it; rank 0 returns the figures, the others {}."""
        results: dict[str, float] = {}
        if engine.zero_optimization_stage() == 3:
            model = self._gathered_copy(engine)
            if model is not None:
                results = self._evaluate(model)
        elif self.is_main:
            results = self._evaluate(engine.module)
        barrier(world)
        return results

    @torch.no_grad()
    def _evaluate(self, model: SlipModel) -> dict[str, float]:
        out: dict[str, float] = {}
        b, threads, augment = self.cfg.eval.batch_size, self.cfg.data.threads, self.cfg.augment
        if self.zeroshot and model.parts.text:
            r = eval_zeroshot(model, augment, self.zeroshot, classnames=self.classnames, templates=self.templates,
                              batch_size=b, threads=threads)  # fmt: skip
            # Skipped images are logged beside the figures they are missing from.
            out.update(zeroshot_top1=r["top1"], zeroshot_top5=r["top5"], zeroshot_skipped=sum(r["skipped"].values()))
        if self.retrieval and model.parts.text:
            r = eval_retrieval(model, augment, self.retrieval, batch_size=b, threads=threads)
            out.update({f"retrieval_i2t_{k}": v for k, v in r["image_to_text"].items()})
            out.update({f"retrieval_t2i_{k}": v for k, v in r["text_to_image"].items()})
            out.update(retrieval_skipped=sum(r["skipped"].values()))
        return out

    def _gathered_copy(self, engine: Any) -> SlipModel | None:
        """Collective: rank 0 gets a plain copy of the ZeRO-3 partitioned model, the others None.
        Rank 0 cannot run the engine's module alone: each submodule's forward hook would start an
        all-gather of its partitions that the other ranks never join."""
        with gathered_module(engine) as module:
            if not self.is_main:
                return None
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the run's RNG
            copy = model_from_config(self.cfg)
        copy.load_state_dict(state)
        return copy.to(next(iter(state.values())).device)
