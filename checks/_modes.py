"""Which layers of a module behave differently in train mode: what makes a frozen module's train mode matter.

A module's ``training`` flag changes nothing by itself; only layers whose forward reads it do. A frozen VAE or text
encoder left in train mode is harmless when none of its layers is mode-dependent (diffusers' AutoencoderKL: its
dropout has p = 0 and GroupNorm has no running statistics), and harmful when some are (BERT-style encoders with
dropout 0.1, a VAE with batch-norm). The `structure` and `scale` checks both judge modes through this one function, so
they cannot disagree about the same module.

A submodule in train mode counts as mode-dependent when it is:

- a dropout layer (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``) with p > 0;
- a normalisation layer that tracks running statistics (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm``
  with ``track_running_stats=True``): train mode normalises with the batch's statistics and updates the running ones;
- an ``nn.RNNBase`` (RNN, LSTM, GRU) with ``dropout`` > 0 between its layers, an ``nn.MultiheadAttention`` with
  ``dropout`` > 0;
- a stochastic-depth layer (class name containing ``DropPath``, ``StochasticDepth`` or ``DropBlock``: timm,
  torchvision) with a drop probability > 0;
- any other module with a numeric attribute whose name contains ``drop`` (``dropout``, ``attention_dropout``,
  ``drop_prob``, ``dropout_p``...) greater than 0: the way attention layers (Hugging Face CLIP, for one) hold a dropout
  probability they apply only in training.

Not counted: a forward that merely branches on ``self.training`` for speed or memory (diffusers' ResnetBlock2D calls
``.contiguous()`` in training), which cannot be told apart from a real difference without running it.
"""

from __future__ import annotations

from typing import Any

STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth", "DropBlock")


def _probability(module: Any, names: tuple[str, ...]) -> float:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def layer_kind(module: Any) -> str | None:
    """The kind of mode-dependent layer ``module`` is (whatever its own mode), or None when its forward does not
    depend on train mode by the rules above."""
    from torch import nn

    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout" if module.p > 0 else None
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return "batch-norm" if module.track_running_stats else None
    if isinstance(module, nn.RNNBase):
        return "rnn dropout" if module.dropout > 0 and module.num_layers > 1 else None
    if isinstance(module, nn.MultiheadAttention):
        return "attention dropout" if module.dropout > 0 else None
    name = type(module).__name__
    if any(key in name for key in STOCHASTIC_DEPTH):
        return "stochastic depth" if _probability(module, ("drop_prob", "p", "drop_rate")) > 0 else None
    if any(isinstance(child, nn.modules.dropout._DropoutNd) for child in module.children()):
        return None  # its probability lives in that dropout child, counted there
    for attr, value in vars(module).items():
        if "drop" in attr.lower() and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and 0 < value <= 1:
            return "dropout"
    return None


def active_layers(module: Any) -> dict[str, int]:
    """Mode-dependent submodules of ``module`` (itself included) that are in train mode now, counted by kind."""
    counts: dict[str, int] = {}
    for sub in module.modules():
        if not sub.training:
            continue
        kind = layer_kind(sub)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def describe(counts: dict[str, int]) -> str:
    """'12 dropout, 1 batch-norm'."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else (words or word + 's')}"
