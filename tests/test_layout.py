"""The layout of a step's packed message (mpisign.optim.layout), without MPI."""

import pytest
import torch

from mpisign.backends.host import HostSigns
from mpisign.backends.packing import WORD_BITS, n_words
from mpisign.optim.layout import build_layout, signature, trainable


def groups(*shapes, frozen=(), dtype=torch.float32):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for i in frozen:
        params[i].requires_grad_(False)
    return [{"params": params[:2]}, {"params": params[2:]}], params


def test_every_parameter_gets_whole_words_in_order():
    gs, params = groups(5, (3, 70), 64, 1)
    layout = build_layout(gs, overlap=False, bucket_words=1, signs=HostSigns())
    assert [s.param for s in layout.slots] == params
    assert [s.group for s in layout.slots] == [0, 0, 1, 1]
    word = 0
    for slot in layout.slots:
        assert slot.word0 == word and slot.words == n_words(slot.param.numel())
        word += slot.words
    assert layout.words == word == layout.packed.size
    assert layout.coordinates == 5 + 210 + 64 + 1
    assert len(layout.buckets) == 1 and layout.buckets[0].word1 == word


def test_overlap_buckets_run_from_the_last_layer_and_hold_about_bucket_words():
    gs, params = groups(*[WORD_BITS * 3] * 6)
    layout = build_layout(gs, overlap=True, bucket_words=6, signs=HostSigns())
    assert [s.param for s in layout.slots] == params[::-1]
    assert [len(b.slots) for b in layout.buckets] == [2, 2, 2]
    for b, nxt in zip(layout.buckets, layout.buckets[1:]):
        assert b.word1 == nxt.word0


def test_frozen_parameters_are_left_out_and_change_the_signature():
    gs, params = groups(4, 4, 4, frozen=(1,))
    assert [p for _, p in trainable(gs)] == [params[0], params[2]]
    before = signature(gs)
    params[1].requires_grad_(True)
    assert signature(gs) != before


def test_the_digest_tells_layouts_apart():
    def digest(shapes, overlap=False, bucket_words=4, dtype=torch.float32):
        gs, _ = groups(*shapes, dtype=dtype)
        return build_layout(gs, overlap, bucket_words, HostSigns()).digest
    base = digest([3, 4, 5])
    assert digest([3, 4, 5]) == base                       # the same on every rank
    assert digest([3, 4, 6]) != base                       # a shape
    assert digest([3, 4, 5], dtype=torch.float64) != base  # a dtype
    assert digest([3, 4, 5], overlap=True) != base         # the bucketing
    assert digest([3, 4, 5], overlap=True, bucket_words=9) != digest([3, 4, 5], overlap=True)


def test_nothing_to_train_is_an_empty_layout_and_complex_parameters_are_refused():
    gs, _ = groups(3, frozen=(0,))
    empty = build_layout(gs, False, 4, HostSigns())
    assert empty.slots == [] and empty.buckets == [] and empty.words == 0
    assert empty.digest != build_layout(groups(3)[0], False, 4, HostSigns()).digest
    complex_ = [{"params": [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]}]
    with pytest.raises(ValueError, match="floating point"):
        build_layout(complex_, False, 4, HostSigns())
