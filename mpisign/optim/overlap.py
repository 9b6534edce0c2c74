"""``Signum(overlap=True)``: start each bucket's vote from the backward pass.

A post-accumulate-grad hook on every parameter marks it ready; when the last parameter of a
bucket is ready, the bucket's momentum update, packing and first phase of its vote start at
once, while autograd still computes the gradients of earlier layers (the layout puts the last
layers in the first buckets). ``step()`` then starts whatever no hook started and finishes all.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from ..mpi.report import Agreed

__all__ = ["BucketHooks", "GradientChanged", "check_threads"]


class GradientChanged(Agreed, RuntimeError):
    """With ``overlap=True``, a gradient changed between the hook that sent its signs and
    ``step()``: raised on every rank, before any parameter moves."""

_LEVELS = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
           MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED",
           MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE"}


def check_threads(params, query=None) -> None:
    """Raise RuntimeError unless MPI may be called from another thread than the main one.

    Gradient hooks of CUDA tensors run on autograd's worker thread for their device, so with
    overlap a vote starts there, beside whatever the main thread does in MPI: that needs
    ``MPI_THREAD_MULTIPLE`` (below it, undefined behaviour). CPU tensors' hooks run on the
    thread that called ``backward()``. ``query`` stands in for ``MPI.Query_thread``."""
    if not any(p.is_cuda for p in params):
        return
    level = (MPI.Query_thread if query is None else query)()
    if level < MPI.THREAD_MULTIPLE:
        raise RuntimeError(
            f"Signum(overlap=True) with CUDA parameters starts votes from autograd's device "
            f"thread, which needs MPI_THREAD_MULTIPLE; this MPI runs at "
            f"{_LEVELS.get(level, level)}. Keep mpi4py's default (mpi4py.rc.thread_level = "
            f"'multiple', set before importing mpi4py.MPI) with an MPI built for threads, or "
            f"use overlap=False.")


class BucketHooks:
    """The hooks of one layout. ``start(bucket)`` starts a bucket's vote; ``where()`` gives
    ``(rank, step)`` for the error a second backward pass gets."""

    def __init__(self, start, where):
        self._start, self._where = start, where
        self._handles: list = []

    def install(self, layout) -> None:
        """Hooks on every parameter of ``layout`` (replacing those of an earlier layout)."""
        self.remove()
        for bucket in layout.buckets:
            for slot in bucket.slots:
                hook = self._hook(bucket, slot.param)
                self._handles.append(slot.param.register_post_accumulate_grad_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def saw(bucket, scale: float) -> None:
        """A hook packed ``bucket`` with gradients unscaled by ``scale``: remember each gradient
        it packed and its version (torch counts every in-place change of a tensor), and the
        scale, to find at step() any that changed."""
        bucket.seen = {id(s.param): (s.param.grad, s.param.grad._version) for s in bucket.slots
                       if s.param.grad is not None}
        bucket.seen_scale = scale

    @staticmethod
    def changed(layout, scale: float) -> list:
        """What a hook packed that step() finds otherwise, in words: each parameter's gradient
        changed in place (clip_grad_norm_, a mask, GradScaler's unscale_) or replaced, by its
        shape; and GradScaler's scale, which scaler.step() sets after the hooks have run."""
        hooked = [b for b in layout.buckets if b.seen_scale is not None]
        out = ["scale"] if any(b.seen_scale != scale for b in hooked) else []
        for bucket in hooked:
            for slot in bucket.slots:
                seen = bucket.seen.get(id(slot.param))
                g = slot.param.grad
                if seen is not None and (g is not seen[0] or g._version != seen[1]):
                    out.append(tuple(slot.param.shape))
        return out

    @staticmethod
    def raise_changed(changed: list, step: int, name: str) -> None:
        """:class:`GradientChanged`, on every rank (``changed``: this rank's, maybe none)."""
        if changed[:1] == ["scale"]:
            raise GradientChanged(
                f"{name}(overlap=True) at step {step} under torch.amp.GradScaler: the hooks "
                f"sent signs of gradients before scaler.step() told the optimizer their scale, "
                f"so the momentum would take them scaled. No parameter moved at this step on "
                f"any rank; this optimizer cannot go on. Give the optimizer its scaler "
                f"(grad_scaler=scaler: the hooks then ask it for the scale), or use "
                f"overlap=False.")
        here = (f"here the gradient of {len(changed)} parameter(s) of shape(s) "
                f"{changed[:4]}{' ...' if len(changed) > 4 else ''} changed"
                if changed else "on another rank a gradient changed")
        raise GradientChanged(
            f"{name}(overlap=True) at step {step}: {here} after its vote had started in the "
            f"backward pass. With overlap the signs leave as soon as backward() completes a "
            f"bucket, so nothing may change .grad between backward() and step() (in-place "
            f"clipping such as clip_grad_norm_, masking, GradScaler's unscale_, a new .grad). "
            f"No parameter moved at this step on any rank; this optimizer cannot go on. Use "
            f"overlap=False (the vote then sees .grad as step() finds it), or change the loss "
            f"instead of the gradient.")

    def _hook(self, bucket, param: torch.Tensor):
        def hook(_):
            if bucket.pending is not None or bucket.packed:
                rank, step = self._where()
                raise RuntimeError(
                    f"Signum(overlap=True) on rank {rank}: a second backward pass accumulated "
                    f"into parameters whose vote had already started at step {step}. With "
                    f"overlap, each bucket's signs are sent as soon as one backward pass "
                    f"completes its gradients, so every backward into the parameters before "
                    f"step() must be the last one. For gradient accumulation, a GAN's second "
                    f"network, or an adversarial (FGSM/PGD) step, use overlap=False; or take "
                    f"the extra gradients with torch.autograd.grad(loss, inputs), which does not "
                    f"accumulate into .grad and starts no vote.")
            bucket.ready.add(id(param))
            if len(bucket.ready) == len(bucket.slots):
                with torch.no_grad():
                    self._start(bucket)
        return hook
