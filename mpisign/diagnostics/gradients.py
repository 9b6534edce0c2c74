"""Stochastic gradients of a real model at a fixed point, for a sample of coordinates.

Two ways to draw a minibatch gradient of batch size B (the loss is the mean cross-entropy):

* ``per-example`` (exact and fast; for models whose parameters all sit in ``nn.Linear`` /
  ``nn.Conv2d`` layers, with no batch norm or dropout, like the small CNN): one pass over a pool
  of P examples gives every example's gradient at the K sampled coordinates, from the layer
  inputs and output gradients (weight gradient = output gradient x input, summed over
  positions). A draw at batch B is then the mean of B random rows, exactly the gradient a
  worker would compute on those B examples. Draws cost almost nothing, so they can be many.
* ``minibatch`` (any model, e.g. ResNets, whose batch norm couples the examples of a batch):
  one forward and backward pass per draw, in train mode, as a worker would.

"The" gradient, the mean the noise is measured from, is the gradient of the mean loss over the
pool (a fixed random subset of the training set), computed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train.data import _loader

__all__ = ["Coordinates", "sample_coordinates", "supports_per_example", "PerExampleGradients",
           "flat_gradient", "pool_gradient", "minibatch_draws", "per_example_draws",
           "hessian_diagonal"]


def _parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class Coordinates:
    """K coordinates of the flattened parameter vector (``model.parameters()`` order)."""

    flat: np.ndarray        # (K,) sorted indices into the flat vector of d entries
    names: list             # (K,) the parameter each one belongs to
    d: int                  # parameters in all

    def __len__(self) -> int:
        return len(self.flat)


def sample_coordinates(model: nn.Module, k: int, rng: np.random.Generator) -> Coordinates:
    """``k`` coordinates drawn uniformly without replacement (all of them if ``k >= d``)."""
    params = _parameters(model)
    sizes = [p.numel() for _, p in params]
    d = sum(sizes)
    flat = np.arange(d) if k >= d else np.sort(rng.choice(d, size=k, replace=False))
    ends = np.cumsum(sizes)
    which = np.searchsorted(ends, flat, side="right")
    return Coordinates(flat, [params[i][0] for i in which], d)


def flat_gradient(model: nn.Module) -> torch.Tensor:
    """The model's ``.grad``s as one flat float64 vector (None counts as zeros)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for _, p in _parameters(model)]).double()


def _batch_gradient(model: nn.Module, x, y, device) -> tuple[torch.Tensor, float]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    return flat_gradient(model), float(loss.detach())


def pool_gradient(model: nn.Module, dataset, pool: np.ndarray, chunk: int, device,
                  workers: int = 0) -> tuple[torch.Tensor, float]:
    """The gradient of the mean loss over ``pool`` (chunked; float64) and that loss."""
    total, loss_sum = None, 0.0
    batches = [pool[i: i + chunk].tolist() for i in range(0, len(pool), chunk)]
    for x, y in _loader(dataset, batches, workers):
        g, loss = _batch_gradient(model, x, y, device)
        total = g * len(y) if total is None else total + g * len(y)
        loss_sum += loss * len(y)
    return total / len(pool), loss_sum / len(pool)


def minibatch_draws(model: nn.Module, dataset, pool: np.ndarray, batch_size: int, draws: int,
                    coords: Coordinates, rng: np.random.Generator, device, workers: int = 0,
                    full: int = 0) -> tuple[np.ndarray, list]:
    """``draws`` gradients on batches of ``batch_size`` random pool examples: ``(N, K)`` at the
    sampled coordinates, and the first ``full`` of them whole (for the density of the noise)."""
    batches = [pool[rng.choice(len(pool), batch_size, replace=False)].tolist()
               for _ in range(draws)]
    out = np.empty((draws, len(coords)))
    idx = torch.as_tensor(coords.flat, device=device)
    whole = []
    for n, (x, y) in enumerate(_loader(dataset, batches, workers)):
        g, _ = _batch_gradient(model, x, y, device)
        out[n] = g[idx].cpu().numpy()
        if n < full:
            whole.append(g.cpu())
    return out, whole


def per_example_draws(per_example: np.ndarray, batch_size: int, draws: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``draws`` minibatch gradients of ``batch_size`` from the per-example rows ``(P, K)``:
    each the mean of ``batch_size`` distinct random rows."""
    p = len(per_example)
    if batch_size > p:
        raise ValueError(f"batch size {batch_size} is larger than the pool of {p} examples: "
                         f"raise --examples or lower --batch-sizes")
    out = np.empty((draws, per_example.shape[1]))
    for n in range(draws):
        rows = rng.choice(p, batch_size, replace=False)
        out[n] = per_example[rows].mean(axis=0, dtype=np.float64)
    return out


# -- per-example gradients at the sampled coordinates ------------------------------------------
def supports_per_example(model: nn.Module) -> tuple[bool, str]:
    """Whether :class:`PerExampleGradients` is exact for ``model``, and if not why not."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return False, f"{name} ({type(m).__name__}) couples or randomizes examples"
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(m) is nn.Linear:
            continue
        if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str):
            continue
        return False, f"{name} ({type(m).__name__}) is not a plain Linear or Conv2d layer"
    return True, ""


class PerExampleGradients:
    """Per-example gradients of the cross-entropy at the sampled coordinates.

    Forward hooks keep each Linear / Conv2d layer's input and output; one backward pass per
    chunk gives the gradients of the summed loss with respect to the outputs (= each example's
    own output gradient) and, on the way, the ordinary parameter gradient. Then, per sampled
    weight ``W[o, c]``: ``sum_positions dL/dout[o] * in[c]`` (for a convolution, ``in[c]`` is
    the input patch row of ``c = (channel, i, j)``, as ``F.unfold`` would give it); per bias
    ``b[o]``: ``sum_positions dL/dout[o]``.
    """

    def __init__(self, model: nn.Module, coords: Coordinates):
        ok, why = supports_per_example(model)
        if not ok:
            raise ValueError(f"per-example gradients are not exact for this model: {why}; "
                             f"use --method minibatch")
        self.model = model
        self.coords = coords
        owner = {id(p): (m, kind) for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)
                 for kind, p in m.named_parameters(recurse=False)}
        # Step 1: for each layer, which sampled coordinates it holds and where they go in K.
        self.plan = {}          # module -> {"weight": (pos, o, c), "bias": (pos, o)}
        offset, params = 0, _parameters(model)
        for _, p in params:
            lo, hi = np.searchsorted(coords.flat, [offset, offset + p.numel()])
            local = coords.flat[lo:hi] - offset
            if len(local):
                m, kind = owner[id(p)]
                pos = torch.arange(lo, hi)
                if kind == "weight":
                    o, c = np.divmod(local, p[0].numel())   # row, column of W.view(out, -1)
                    entry = (pos, torch.as_tensor(o), torch.as_tensor(c))
                else:
                    entry = (pos, torch.as_tensor(local))
                self.plan.setdefault(m, {})[kind] = entry
            offset += p.numel()
        self.params = [p for _, p in params]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, float]:
        """``(G, grad_sum, loss_sum)``: G is ``(n, K)``, each example's own gradient; grad_sum
        the flat gradient of the summed loss (float64), loss_sum the summed loss."""
        inputs, outputs = {}, {}

        def hook(module, args, output):
            inputs[module] = args[0].detach()
            outputs[module] = output
            # A following in-place op (ReLU(inplace=True)) must not rewrite the tensor whose
            # gradient we ask for: hand the rest of the network a copy.
            return output.clone()

        handles = [m.register_forward_hook(hook) for m in self.plan]
        try:
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
        finally:
            for h in handles:
                h.remove()
        modules = list(self.plan)
        grads = torch.autograd.grad(loss, [outputs[m] for m in modules] + self.params)
        out_grads, param_grads = grads[: len(modules)], grads[len(modules):]
        G = torch.zeros(len(y), len(self.coords), dtype=torch.float64)
        # Step 2: per layer, the sampled coordinates of each example's gradient.
        for m, delta in zip(modules, out_grads):
            inp = inputs[m]
            if type(m) is nn.Linear:
                delta = delta.reshape(len(y), -1, m.out_features).transpose(1, 2)  # (n, out, T)
            else:
                delta = delta.flatten(2)                                           # (n, out, P)
            plan = self.plan[m]
            if "weight" in plan:
                pos, o, c = plan["weight"]
                o, c = o.to(inp.device), c.to(inp.device)
                if type(m) is nn.Linear:
                    rows = inp.reshape(len(y), -1, m.in_features).transpose(1, 2)[:, c, :]
                else:
                    rows = _conv_patches(m, inp, c)
                G[:, pos] = (delta[:, o, :] * rows).sum(-1).double().cpu()
            if "bias" in plan:
                pos, o = plan["bias"]
                o = o.to(inp.device)
                G[:, pos] = delta[:, o, :].sum(-1).double().cpu()
        grad_sum = torch.cat([g.reshape(-1) for g in param_grads]).double()
        return G.numpy(), grad_sum, float(loss.detach())

    def over_pool(self, dataset, pool: np.ndarray, chunk: int, device, workers: int = 0):
        """``(G, mean_gradient, mean_loss)`` over the pool: G is ``(P, K)`` float32."""
        G = np.empty((len(pool), len(self.coords)), dtype=np.float32)
        total, loss_sum, row = None, 0.0, 0
        batches = [pool[i: i + chunk].tolist() for i in range(0, len(pool), chunk)]
        for x, y in _loader(dataset, batches, workers):
            g, s, loss = self(x.to(device), y.to(device))
            G[row: row + len(y)] = g
            row += len(y)
            total = s if total is None else total + s
            loss_sum += loss
        return G, total / len(pool), loss_sum / len(pool)


def _conv_patches(m: nn.Conv2d, inp: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Rows ``columns`` of ``F.unfold(inp)`` for the convolution ``m``: ``(n, k, positions)``.

    Column ``c`` of ``W.view(out, -1)`` is (input channel, kernel row i, kernel column j); its
    patch row is the padded input channel read at offset (i, j) with the stride. Only the
    sampled rows are gathered: unfolding the whole input costs far more."""
    kh, kw = m.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, m.padding
    channel, rest = columns // (kh * kw), columns % (kh * kw)
    i, j = rest // kw, rest % kw
    xp = F.pad(inp, (pw, pw, ph, ph))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = i[:, None] * dh + sh * torch.arange(h_out, device=inp.device)[None]     # (k, h_out)
    cols = j[:, None] * dw + sw * torch.arange(w_out, device=inp.device)[None]     # (k, w_out)
    patches = xp[:, channel[:, None, None], rows[:, :, None], cols[:, None, :]]    # (n, k, h, w)
    return patches.flatten(2)


def hessian_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probes: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Hutchinson's estimate of diag(H) of the mean loss on ``(x, y)``: the mean over Rademacher
    probes z of ``z * (H z)`` (one Hessian-vector product each). Flat, float64."""
    params = [p for _, p in _parameters(model)]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    acc = [torch.zeros_like(p) for p in params]
    for _ in range(probes):
        z = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        hz = torch.autograd.grad(grads, params, grad_outputs=z, retain_graph=True)
        for a, zi, hi in zip(acc, z, hz):
            a.add_(zi * hi)
    return torch.cat([a.reshape(-1) for a in acc]).double() / probes
