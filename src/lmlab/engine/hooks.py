"""The one protocol through which a method adds to the training loop (lmlab.engine.train).

A method subclasses `Hooks` once and overrides what it needs; every method receives the `TrainState`
(`state.step` is the number of optimizer steps done, `state.model` the model, `state.history` the metrics so far),
so no method keeps a step counter of its own. A hook with state of its own that training depends on (a curriculum,
a monitor, a file it appends to) returns it from `state_dict()` as JSON-able values and takes it back in
`load_state_dict()`: it goes into every checkpoint, and a resumed run continues with it.

    class MyHooks(Hooks):
        select, higher_is_better = "val_acc", True
        def evaluate(self, state):
            return {"val_acc": accuracy(state.model)}
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmlab.engine import distributed as D
from lmlab.engine.losses import LossOut, causal_lm_loss, collate_lm
from lmlab.engine.optim import GroupRule

if TYPE_CHECKING:
    from lmlab.engine.state import TrainState


class Hooks:
    """Plain causal language modelling with no evaluation: the defaults of every method below."""

    select: str = "val_loss"  # the evaluation metric that picks the best weights and drives early stopping
    higher_is_better: bool = False
    restore_best: bool | None = None  # load the best evaluation's weights at the end (None: when early stopping)

    def param_rules(self) -> Sequence[GroupRule]:
        """Optimizer groups with their own learning rate / weight decay (regex on parameter names)."""
        return ()

    def collate(self, examples: list):
        """A micro-batch from a list of training examples."""
        return collate_lm(examples)

    def loss(self, state: TrainState, model: torch.nn.Module, batch) -> LossOut:
        """The micro-batch's loss as a SUM with its number of units (`model` may be the DDP / compiled wrapper)."""
        return causal_lm_loss(model, batch)

    def aux_loss(self, state: TrainState) -> torch.Tensor | None:
        """A per-step penalty on the model, added with unit weight after the gradients are averaged."""
        return None

    def begin(self, state: TrainState, resumed: bool) -> None:
        """Called once before the first step, after any resume (`resumed`: the state came from a checkpoint, and
        `load_state_dict` has run). A hook that writes files can drop an earlier attempt's output here."""

    def after_backward(self, state: TrainState) -> None:
        """Called with the step's final gradients, before clipping and the optimizer step (e.g. to drop the
        gradients of parameters frozen for the first steps of a curriculum)."""

    def after_step(self, state: TrainState) -> None:
        """Called after each optimizer step (`state.step` already counts it)."""

    def evaluate(self, state: TrainState) -> dict | None:
        """Metrics of `state.model` (in eval mode, without gradients) every `train.eval_every` steps and at the
        end; None: this method does not evaluate."""
        return None

    @property
    def evaluates(self) -> bool:
        return type(self).evaluate is not Hooks.evaluate

    def state_dict(self) -> dict:
        """The hook's own state as JSON-able values (module doc)."""
        return {}

    def load_state_dict(self, values: dict) -> None:
        """Take back what `state_dict` returned, when a run resumes from a checkpoint."""


class PaddedLM(Hooks):
    """Plain causal language modelling with batches right-padded with `pad_token_id`."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def collate(self, examples: list):
        return collate_lm(examples, pad_token_id=self.pad_token_id)


@dataclass
class Display:
    """How the loop shows itself: a progress bar (rank 0, when `progress`), named `desc`, and one-line messages
    through `log` (by default nowhere)."""

    progress: bool = True
    desc: str = "train"
    log: Callable[[str], None] | None = None  # None: stderr, from the first process only
    position: int | None = None  # the bar's line on the terminal (cells running side by side: one line each)
    trackers: tuple[str, ...] = ()  # experiment trackers a study's cells log to (lmlab.tracking)
    record: Callable[[dict], None] | None = None  # each metrics.jsonl record as it is written (a cell's tracker)

    def named(self, desc: str) -> Display:
        """The same display for another loop (a cell, a pretraining phase), named `desc`."""
        return dataclasses.replace(self, desc=desc)

    def line(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        elif D.is_main():
            print(message, file=sys.stderr, flush=True)
