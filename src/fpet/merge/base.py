"""The merge slot's one signature, `merge(state) -> state`, and what every strategy class owns.

A strategy is an `nn.Module` (it may own parameters; they train with the PET parameters) placed between attention
and MLP of the blocks its config names. It receives the `fpet.state.TokenState` of that point: tokens, sizes,
the protected prefix (class, distillation, prompt tokens), the patch grid and the attention statistics it declared
in `needs` (head-mean `keys`, the class-token attention row `cls_attn`, `attn_received`).

Most strategies implement only `match(state) -> Reduce`: which tokens go together, as a function that maps any
per-token tensor `[B, N, D]` to the merged tokens `[B, N', D]` by summing (or taking the max over) each group's
members. The base class turns that into the size-weighted average of the tokens, the new sizes, masks and sources.
A strategy that does more (pruning, a custom weighting) overrides `forward`.

The class is also the strategy's registry record (`fpet.merge.MERGE_STRATEGIES`): it owns its config rules
(`config_problems`), where it may sit (`every_block`, `max_layers`) and how it is built from `cfg.merge`
(`from_config`); `fpet.merge.schedule` holds only the rules shared by all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from omegaconf import DictConfig
from torch import Tensor, nn

from fpet.state import TokenState

if TYPE_CHECKING:
    from fpet.merge.schedule import Geometry

Reduce = Callable[[Tensor, str], Tensor]
"""`reduce(t [B, N, D], mode) -> [B, N', D]`; mode is "sum" or "amax"."""


def merge_wavg(reduce: Reduce, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average of each group: `x [B, N, C], size [B, N, 1] -> (x [B, N', C], size [B, N', 1])`."""
    x = reduce(x * size, "sum")
    size = reduce(size, "sum")
    return x / size, size


class TokenMerge(nn.Module):
    """Base class of merge strategies.

    Class attributes (the strategy's placement rules, read by `fpet.merge.schedule`):
        name: the config name (`merge=<name>`), label: its name in tables.
        needs: attention statistics the strategy reads from the state (`fpet.state.ATTENTION_STATS`).
        every_block: `merge.layer=null` means every block (else null is an error).
        max_layers: how many blocks it may sit at (None = any number).
        weighted: True averages a group's members weighted by size; False takes their elementwise max.
        static_tokens: the number of tokens it leaves depends on the input's shape only, never on its values, so
            its inference graph is static (`fpet.export` exports it with a dynamic batch dimension). A strategy
            that keeps an input-dependent number of tokens (a learned threshold) sets False: it exports for
            batch size 1 only, or not at all; runs then also report `tokens_kept` (mean / min / max over the
            evaluation split) besides `tokens_out` (one image).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    every_block: ClassVar[bool] = False
    max_layers: ClassVar[Optional[int]] = None
    weighted: bool = True
    static_tokens: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: DictConfig, geo: "Geometry") -> "TokenMerge":
        """The strategy for one block from `cfg.merge` (every key read from the config: its yaml holds the
        defaults) on a backbone of geometry `geo`."""
        raise NotImplementedError

    @classmethod
    def build(cls, cfg: DictConfig, geo: "Geometry", layers: list[int]) -> dict[int, "TokenMerge"]:
        """The modules of the blocks `layers` (validated): one `from_config` each unless the strategy schedules
        something across blocks (ToMe's `[r, inflection]` schedule)."""
        return {layer: cls.from_config(cfg, geo) for layer in layers}

    @classmethod
    def prepare(cls, model: nn.Module, cfg: DictConfig, source: Any) -> Optional[dict]:
        """Data-dependent set-up once the merges are placed (`fpet.model.build_model`), e.g. DiffRate's rate search
        (replaces `model.merges`). `cfg` is the full config, `source` a `fpet.select.ScoringInput` (device, the
        run's cache file, whose directory holds what the set-up stores; or a task file being evaluated). Returns
        a summary, or None: nothing to prepare (the default)."""
        return None

    @classmethod
    def layers(cls, cfg: DictConfig, geo: "Geometry") -> tuple[list[int], list[str]]:
        """The blocks `cfg.merge.layer` names, and its problems (shared rules: `fpet.merge.schedule`)."""
        from fpet.merge.schedule import parse_layers

        return parse_layers(cls, cfg.get("layer"), geo)

    @classmethod
    def config_problems(cls, cfg: DictConfig, geo: "Geometry", layers: list[int]) -> list[str]:
        """The strategy's own config problems (key, value, accepted), the shared layer rules already checked."""
        return []

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict:
        """The strategy's settings, for `repr`."""
        return {}

    def train_progress(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        """Called by the training loop before every step (`set_train_progress`): a strategy with a training
        schedule (EViT's keep-rate warm-up) sets its value for the step from the progress; `iteration` counts
        steps from the first epoch. Evaluation never depends on it. Default: nothing."""

    def aux_loss(self, state: TokenState) -> Optional[Tensor]:
        """A term added to the training loss, from the final token state (its `trace`); called once per strategy
        (on its first module). None: nothing to add."""
        return None

    def constrain(self) -> None:
        """Called after each optimiser step (e.g. clamp learned thresholds into their range)."""

    def export_problem(self) -> Optional[str]:
        """Why this module's inference cannot become a file that reproduces it (`fpet.export`), or None."""
        return None

    def match(self, state: TokenState) -> Reduce:
        """Decide the groups of `state`'s tokens (prefix tokens pass through first)."""
        raise NotImplementedError

    def forward(self, state: TokenState) -> TokenState:
        """`state [B, N] -> state [B, N']`: merged tokens, sizes, masks and sources; statistics cleared."""
        size = state.sizes()
        reduce = self.match(state)
        if self.weighted:
            x, new_size = merge_wavg(reduce, state.x, size)
        else:
            x, new_size = reduce(state.x, "amax"), reduce(size, "sum")
        mask = None if state.mask is None else reduce(state.mask * size, "sum") / new_size
        source = None if state.source is None else reduce(state.source, "sum")
        return state.replace(x=x, size=new_size, mask=mask, source=source)


def set_train_progress(model: nn.Module, epoch: int, step: int, steps_per_epoch: int) -> None:
    """Tell every merge strategy of `model` where training is: step `step` of epoch `epoch` (both from 0)."""
    for module in model.modules():
        if isinstance(module, TokenMerge):
            module.train_progress(epoch, epoch * steps_per_epoch + step, steps_per_epoch)


class NoMerge(TokenMerge):
    """`merge=none`: no block merges; 197 tokens through all blocks of ViT-B/16."""

    name, label = "none", "w/o merging"
    needs = frozenset()

    @classmethod
    def layers(cls, cfg: DictConfig, geo: "Geometry") -> tuple[list[int], list[str]]:
        return [], []
