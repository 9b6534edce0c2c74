"""Lion's kernels against torch's own ops on the device they run on, once per device.

:class:`mpisign.optim.lion.LionRule` is written in torch ops, so a rank whose kernels take its
step must hold the bits torch would give there: the reference here is torch on the same device,
not :mod:`mpisign.backends.packing` (the reference of :mod:`.kernels`' self-check).

* :func:`lion_form`: how torch rounds Lion's ``_foreach_add_(c, g, alpha=a)`` after
  ``c = m * beta``: "fused" (``c + a * g`` as one FMA: nvcc contracts the ``a + alpha * b`` of
  torch's CUDA kernels unless told not to) or "separate" (two roundings). ``lion_update_pack``
  runs in each form beside torch's ops on the same inputs (ragged lengths, NaN, inf, zeros,
  subnormals, both zero bits, a 3-block grid, a side stream, words at offsets of a larger
  buffer); the first form that gives torch's momentum, signs and non-finite count is taken.
  None (an ERROR) when neither does: Lion keeps torch's ops there, one pass slower.
* :func:`decayed_lr`: the ``lr`` to give ``apply_decayed`` so that it gives torch's
  ``p.mul_(decay)`` then ``p.add_(v, alpha=-lr)`` bit for bit (every NaN as
  :data:`mpisign.backends.packing.CANONICAL_NAN`), per dtype: torch keeps ``alpha`` in float32
  (its CUDA kernels' opmath; :data:`LR_ROUNDINGS` "float32") or, as its CPU kernels do for
  float16 and bfloat16, rounds it to the tensor's dtype ("dtype"). None for a dtype where the
  kernel matches neither (an ERROR): torch's two ops do the apply there.

Kernel or fallback, a rank holds the same bits: the kernels run only where they give torch's.
:func:`check` runs them at start-up (:func:`mpisign.cuda.bridge.local_level`, through ``_kernels_work``); a path
that asks first runs them then; either way once per device. ``kernels`` is :mod:`.kernels`, or
in the tests the same module with its launches run by the host shim on CPU tensors
(:func:`mpisign.cuda.emulate.kernels_on_cpu`), then compared with torch's CPU ops.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..backends import packing
from . import kernels as _device_kernels

__all__ = ["FORMS", "LR_ROUNDINGS", "check", "lion_form", "decayed_lr", "lr_as", "compare_lion",
           "compare_decayed", "torch_lion_step", "torch_apply_decayed"]

log = logging.getLogger(__name__)

FORMS = ("fused", "separate")   # tried in this order: nvcc contracts by default
LR_ROUNDINGS = ("float32", "dtype")   # of alpha=-lr in torch's add, tried in this order
_LENGTHS = (4099, 65, 1)        # whole words, a ragged one, a lone coordinate
#: (beta1, alpha1, beta2, alpha2) of the check: Lion's default betas under a GradScaler's 1/2.7.
_HPARAMS = (0.9, 0.1 / 2.7, 0.99, 0.01 / 2.7)
_results: dict = {}             # (what, device) -> result, once per device


def torch_lion_step(grads: list, bufs: list, beta1: float, alpha1: float, beta2: float,
                    alpha2: float) -> list:
    """Lion's local step in torch's ops, as :class:`mpisign.optim.lion.LionRule` and the engine
    do it (non-finite entries of ``grads`` as 0): ``bufs`` updated in place; returns each c."""
    grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    c = torch._foreach_mul(bufs, beta1)
    torch._foreach_add_(c, grads, alpha=alpha1)
    torch._foreach_mul_(bufs, beta2)
    torch._foreach_add_(bufs, grads, alpha=alpha2)
    return c


def torch_apply_decayed(p: torch.Tensor, v: torch.Tensor, lr: float,
                        decay: float) -> torch.Tensor:
    """``p.mul_(decay)`` then ``p.add_(v, alpha=-lr)`` (``v`` the unpacked vote, +0.0 at a
    tie), every NaN then the canonical one: what ``apply_decayed`` must give. Returns ``p``."""
    p.mul_(decay)
    p.add_(v.view_as(p), alpha=-lr)
    return packing.canonicalize_nan_(p)


def lr_as(lr: float, dtype: torch.dtype, rounding: str) -> float:
    """``lr`` as ``apply_decayed`` must take it for torch's ``alpha=-lr`` rounded as
    ``rounding`` (:data:`LR_ROUNDINGS`) says; the kernel rounds it to float32 itself."""
    if rounding == "dtype":
        return -float(torch.tensor(-lr, dtype=dtype))
    return lr


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _device_kernels._same_floats(a.cpu(), b.cpu())


def _lion_inputs(gen: torch.Generator) -> tuple[list, list]:
    """Gradients with NaN, inf, zeros and subnormals; momenta with subnormals, and 0 where the
    gradient is 0 or not finite, so that c is an exact 0 there."""
    gs, ms = [], []
    for n in _LENGTHS:
        g = _device_kernels._special_floats(n, gen)
        m = torch.randn(n, generator=gen)
        m[::7] *= 1e-39
        m[~torch.isfinite(g) | (g == 0)] = 0.0
        gs.append(g)
        ms.append(m)
    return gs, ms


def compare_lion(device, fused: bool, kernels=None, seed: int = 3) -> list[str]:
    """Where ``lion_update_pack`` in one form differs from :func:`torch_lion_step` on
    ``device`` (empty: nowhere)."""
    kernels = _device_kernels if kernels is None else kernels
    device, gen, bad = torch.device(device), torch.Generator().manual_seed(seed), []
    with kernels._side_stream(device), kernels._grid_cap(3):
        for zero_bit in (0, 1):
            gs, ms = _lion_inputs(gen)
            want_m = [m.to(device, copy=True) for m in ms]
            want_c = torch_lion_step([g.to(device) for g in gs], want_m, *_HPARAMS)
            got_m = [m.to(device, copy=True) for m in ms]
            words = kernels._poisoned(sum(packing.n_words(g.numel()) + 1 for g in gs) + 1, device)
            nonfinite, start, guards = torch.zeros(1, dtype=torch.int64, device=device), 1, [0]
            for g, m, c, wm in zip(gs, got_m, want_c, want_m):
                w = packing.n_words(g.numel())
                out = words[start: start + w]
                kernels.lion_update_pack(g.to(device), m, *_HPARAMS, zero_bit, fused, out=out,
                                         nonfinite=nonfinite)
                what = f"n={g.numel()} zero_bit={zero_bit}"
                if not np.array_equal(kernels._host(out).view(np.uint64),
                                      packing.pack_signs(c.cpu(), zero_bit)):
                    bad.append(f"signs {what}")
                if not _same(m, wm):
                    bad.append(f"momentum {what}")
                start += w + 1
                guards.append(start - 1)
            want_count = sum(int((~torch.isfinite(g)).sum()) for g in gs)
            if int(nonfinite.item()) != want_count:   # waits for the kernels: a check, once
                bad.append(f"non-finite count {int(nonfinite.item())} != {want_count}")
            if set(kernels._host(words[guards]).tolist()) != {kernels._POISON_WORD}:
                bad.append("lion_update_pack wrote outside its words")
    return bad


def _vote(n: int, m: int, gen: torch.Generator):
    votes = np.stack([packing.pack_signs(_device_kernels._special_floats(n, gen), r % 2)
                      for r in range(m)])
    return packing.majority(packing.tally(votes), m, n)


def compare_decayed(device, dtype: torch.dtype, rounding: str, kernels=None,
                    seed: int = 4) -> list[str]:
    """Where ``apply_decayed`` on ``dtype`` parameters, given :func:`lr_as` ``rounding``,
    differs from :func:`torch_apply_decayed` on ``device``: with and without ties, NaN, inf,
    subnormals, parameters in the middle of a larger tensor. Empty: nowhere."""
    kernels = _device_kernels if kernels is None else kernels
    device, gen, bad = torch.device(device), torch.Generator().manual_seed(seed), []

    def on_device(words):
        return None if words is None else torch.from_numpy(words.view(np.int64)).to(device)
    with kernels._side_stream(device), kernels._grid_cap(3):
        for n in _LENGTHS:
            for m in (3, 4):   # no ties, ties
                plus, tie = _vote(n, m, gen)
                v = packing.unpack_signs(plus, n, tie, dtype=dtype).to(device)
                p0 = kernels._special_floats(n, gen).to(dtype)
                for lr, decay in ((0.01, 1 - 0.01 * 0.1), (3.0, 0.5), (1e-4, 1.0), (0.5, 0.0)):
                    want = torch_apply_decayed(p0.to(device, copy=True), v, lr, decay)
                    big = torch.cat([torch.full((2,), 7.0, dtype=dtype), p0,
                                     torch.full((3,), 9.0, dtype=dtype)]).to(device)
                    before = big.clone()
                    kernels.apply_decayed(big[2: 2 + n], on_device(plus), on_device(tie),
                                          lr_as(lr, dtype, rounding), decay)
                    if not (_same(big[2: 2 + n], want) and _same(big[:2], before[:2])
                            and _same(big[2 + n:], before[2 + n:])):
                        bad.append(f"apply_decayed {dtype} n={n} m={m} lr={lr} decay={decay}")
    return bad


def _key(what: str, device) -> tuple:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return what, str(device)


def lion_form(device, kernels=None) -> str | None:
    """How torch rounds Lion's step on ``device`` as ``lion_update_pack`` can: "fused" or
    "separate"; None when the kernel matches neither (logged as an ERROR). Once per device."""
    key = _key("form", device)
    if key not in _results:
        found = {}
        try:
            for form in FORMS:
                found[form] = compare_lion(device, form == "fused", kernels)
                if not found[form]:
                    break
        except Exception as exc:   # a launch error is a failed check, not a crash
            found["error"] = [f"{type(exc).__name__}: {exc}"]
        _results[key] = next((f for f in FORMS if found.get(f) == []), None)
        if _results[key] is None:
            log.error("Lion's fused kernel on %s DISAGREES with torch there in every form (%s): "
                      "Lion takes torch's own ops on this device", device,
                      "; ".join(f"{f}: {', '.join(b[:3])}" for f, b in found.items()))
        else:
            log.info("Lion's fused kernel on %s rounds as torch does there (%s adds)", device,
                     _results[key])
    return _results[key]


def _decayed_rounding(device, dtype: torch.dtype, kernels) -> str | None:
    found = {}
    try:
        for rounding in LR_ROUNDINGS:
            found[rounding] = compare_decayed(device, dtype, rounding, kernels)
            if not found[rounding]:
                return rounding
    except Exception as exc:   # a launch error is a failed check, not a crash
        found["error"] = [f"{type(exc).__name__}: {exc}"]
    log.error("apply_decayed on %s DISAGREES with torch's p.mul_(decay), p.add_(v, alpha=-lr) "
              "for %s there (%s): torch's own ops do it", device, dtype,
              "; ".join(f"lr as {r}: {', '.join(b[:3])}" for r, b in found.items()))
    return None


def decayed_lr(device, dtype: torch.dtype, lr: float, kernels=None) -> float | None:
    """The ``lr`` that makes ``apply_decayed`` on ``dtype`` parameters round as torch does on
    ``device`` (:func:`lr_as`), or None where it cannot (logged as an ERROR). Checked once per
    device and dtype."""
    key = _key(f"decayed {dtype}", device)
    if key not in _results:
        _results[key] = _decayed_rounding(device, dtype, kernels)
        if _results[key] is not None:
            log.info("apply_decayed on %s rounds as torch does there for %s (alpha in %s)",
                     device, dtype, _results[key])
    rounding = _results[key]
    return None if rounding is None else lr_as(lr, dtype, rounding)


def check(device, kernels=None) -> None:
    """Every check on ``device``, each once and logged: Lion's form, and how apply_decayed
    takes lr for each kernel dtype."""
    kernels = _device_kernels if kernels is None else kernels
    lion_form(device, kernels)
    for dtype in kernels._SUFFIX:
        decayed_lr(device, dtype, 1.0, kernels)
