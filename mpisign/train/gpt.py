"""``--model gpt``: a small decoder-only transformer language model (GPT-2's shape, scaled down).

Bytes in, a distribution over the next byte out::

    x = tok(idx) + pos(0..T-1)
    x = x + proj(attention(LN(x)))      # causal self-attention, heads of width/heads
    x = x + MLP(LN(x))                  # width -> 4 width -> GELU -> width       (x layers)
    logits = LN(x) @ tok.weight^T       # the output layer is the input embedding (tied)

Pre-LayerNorm blocks (the residual stream is never normalized), learned positional embeddings,
attention by ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, no dropout.
Initialization as GPT-2's: N(0, 0.02) weights, zero biases, and the projections that write into
the residual stream scaled down by ``1/sqrt(2 layers)``. At initialization the logits are small
and the loss is close to ln(vocab) (5.55 nats for bytes).

The defaults (:data:`mpisign.train.options.GPT_SIZE`: 4 layers, width 128, 4 heads, context 128)
hold 0.84M parameters: a few minutes of training on a 2-core machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .options import GPT_SIZE

__all__ = ["GPT"]


class Block(nn.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then an MLP, each added to
    the residual stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only transformer over ``vocab`` tokens, contexts of up to ``context``.

    ``forward(idx)``: token ids ``(B, T)``, ``T <= context``, to logits ``(B, T, vocab)``; the
    logits at position t predict token t + 1.
    """

    def __init__(self, vocab: int = 256, context: int = GPT_SIZE["context"],
                 layers: int = GPT_SIZE["layers"], width: int = GPT_SIZE["width"],
                 heads: int = GPT_SIZE["heads"]):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight   # tied: one matrix, counted and voted once
        self.apply(self._init)
        for block in self.blocks:   # the residual stream grows with depth: GPT-2's scaling
            for layer in (block.proj, block.out):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"a sequence of {t} tokens is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
