"""Character-level language modelling on TinyShakespeare with a small causal transformer.

Data: one plain-text file, ``input.txt`` inside ``--data-dir`` (or ``--data-dir``
naming the file itself).  The vocabulary is the sorted set of characters of the
whole file (65 for the usual TinyShakespeare).  The first 90% of the characters
train, the last 10% validate.

Samples: a training sample is a window of ``context + 1`` consecutive characters
at a random offset (drawn once from ``seed``): inputs are the first ``context``,
targets the same window shifted by one.  Validation uses consecutive
non-overlapping windows of the validation text, so it is deterministic.

Loss: mean cross-entropy per predicted character, in nats; ``val_loss`` is the
same over the validation windows and the metric ``val_bits_per_char`` is
``val_loss / ln 2``.  An untrained model predicts nearly uniformly, so its loss is
close to ``ln(vocabulary size)`` (≈ 4.17 for 65 characters).

Model (``transformer``): ``nn.Sequential(TokenEmbedding, Block × layers, Head)``,
every module mapping one tensor to one tensor, so that the model can be cut into
pipeline stages (APTS-IP).  Pre-norm blocks: causal multi-head self-attention and
a 4× MLP with GELU, each in a residual branch.  Attention is written out (no fused
kernel) so that it composes with ``torch.func`` and double backward.

Options: :class:`TinyShakespeareOptions` (``hpcopt options tinyshakespeare``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcopt.config import require
from hpcopt.errors import DataError
from hpcopt.problems.base import Dataset, Net, Problem, ProblemOptions, as_sums, build_options, evaluation_mode
from hpcopt.problems.defaults import TrainingDefaults


@dataclass
class TinyShakespeareOptions(ProblemOptions):
    """Options of ``tinyshakespeare``.

    Attributes:
        context: characters of context (the window length).
        train_windows: training samples (windows at random offsets).
        val_windows: validation windows (at most what the validation text holds).
        embed: embedding width of the transformer.
        heads: attention heads per block (must divide ``embed``).
        layers: transformer blocks.
    """

    problem: ClassVar[str] = "tinyshakespeare"
    # Measured in docs/problems.md ("Defaults for train"): three epochs of 16 steps, an
    # evaluation after each, in under two minutes on one core.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(epochs=3, batch_size=256)
    minimum: ClassVar[Mapping[str, float]] = {
        "context": 1,
        "train_windows": 1,
        "val_windows": 1,
        "embed": 1,
        "heads": 1,
        "layers": 1,
    }

    context: int = 64
    # 4096 windows (16 steps of 256), not the ~20 000 that cover the text once: an epoch,
    # and so an evaluation, every ~30 s on one core instead of every ~2 minutes.
    train_windows: int = 4096
    val_windows: int = 500
    embed: int = 64
    heads: int = 4
    layers: int = 2

    def validate(self) -> None:
        super().validate()
        require(
            self.embed % self.heads == 0,
            f"problem '{self.problem}': embed={self.embed} is not divisible by heads={self.heads}",
        )


def read_text(data_dir: str | None) -> str:
    """The corpus: ``data_dir/input.txt``, or ``data_dir`` itself when it is a file.

    Raises:
        DataError: missing, unreadable, empty, or not UTF-8 text.
    """
    if data_dir is None:
        raise DataError("tinyshakespeare needs --data-dir (a folder with input.txt, or the text file itself)")
    path = Path(data_dir)
    if path.is_dir():
        path = path / "input.txt"
    if not path.is_file():
        raise DataError(f"tinyshakespeare: no text file at {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"tinyshakespeare: cannot read {path}: {exc}") from exc
    if not raw:
        raise DataError(f"tinyshakespeare: {path} is empty")
    if b"\x00" in raw:
        raise DataError(f"tinyshakespeare: {path} is not a text file (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"tinyshakespeare: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


class TokenEmbedding(nn.Module):
    """Token plus learned positional embedding: ``(B, T)`` int64 → ``(B, T, embed)``."""

    def __init__(self, vocab: int, context: int, embed: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, embed)
        self.position = nn.Embedding(context, embed)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return self.token(tokens) + self.position(positions)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    mask: Tensor  # a buffer (register_buffer below), which nn.Module.__getattr__ types as Tensor | Module

    def __init__(self, embed: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(embed)
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)
        self.norm2 = nn.LayerNorm(embed)
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed))
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, embed = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(embed, dim=-1)
        shape = (batch, length, self.heads, embed // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(embed // self.heads)
        scores = scores.masked_fill(~self.mask[:length, :length], float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, embed)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final layer norm and the vocabulary projection: ``(B, T, embed)`` → logits ``(B, T, vocab)``."""

    def __init__(self, embed: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed)
        self.out = nn.Linear(embed, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x))


def transformer(vocab: int, context: int, embed: int, heads: int, layers: int) -> nn.Sequential:
    """The causal character model as a flat ``nn.Sequential`` (see the module docstring)."""
    model = nn.Sequential(
        TokenEmbedding(vocab, context, embed),
        *(Block(embed, heads, context) for _ in range(layers)),
        Head(embed, vocab),
    )
    # GPT-2 style initialisation: small weights, so untrained logits are near zero and
    # the initial loss is near ln(vocab).
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


class TinyShakespeareProblem(Problem):
    """Next-character prediction (see the module docstring)."""

    name = "tinyshakespeare"
    metric_name = "val_bits_per_char"
    metric_higher_is_better = False
    default_model = "transformer"
    models = ("transformer",)

    def __init__(
        self, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        opts = build_options(TinyShakespeareOptions, options)
        self.context = opts.context
        self.embed, self.heads, self.layers = opts.embed, opts.heads, opts.layers
        text = read_text(data_dir)
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        lookup = {c: i for i, c in enumerate(self.chars)}
        tokens = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        split = int(0.9 * len(tokens))
        train_text, val_text = tokens[:split], tokens[split:]
        window = self.context + 1
        if len(train_text) < window or len(val_text) < window:
            raise DataError(
                f"tinyshakespeare: the text ({len(tokens)} characters) is too short for context {self.context}"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train_text) - window + 1, (opts.train_windows,), generator=generator)
        self.train = self._windows(train_text, starts)
        n_val = min(opts.val_windows, (len(val_text) - 1) // self.context)
        self.val = self._windows(val_text, torch.arange(n_val) * self.context)
        self.default_batch_size = opts.train_defaults.batch_for(len(self.train))

    def _windows(self, text: Tensor, starts: Tensor) -> Dataset:
        index = starts[:, None] + torch.arange(self.context + 1)
        chunk = text[index]
        return Dataset(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())

    def _make_model(self, name: str) -> nn.Module:
        return transformer(self.vocab_size, self.context, self.embed, self.heads, self.layers)

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        return net(inputs)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[Σ nll (nats), predicted characters]``."""
        total, count = 0.0, 0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks(200):
                logits = net(chunk.inputs)
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).double(), chunk.targets.reshape(-1), reduction="sum"
                ).item()
                count += chunk.targets.numel()
        return as_sums(total, count)

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        total, count = sums.tolist()
        loss = total / max(count, 1.0)
        return {"val_loss": loss, "val_bits_per_char": loss / math.log(2)}
