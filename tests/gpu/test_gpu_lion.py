"""Lion's GPU kernels on a real device, against torch's own ops on that device. Run on a GPU
node:

    pytest tests/gpu

Skipped where there is no CUDA device or no CuPy. lion_update_pack and apply_decayed must give
torch's CUDA bits (mpisign.cuda.torch_check picks the kernel's rounding form at start-up); then
mpisign.Lion on one rank with CUDA parameters against the same optimizer on CPU copies.
"""

import numpy as np
import pytest
import torch
from specials import special_floats

from mpisign.backends import native, packing

try:
    import cupy  # noqa: F401
except ImportError as exc:  # not installed, or installed without its CUDA libraries
    pytest.skip(f"CuPy is not importable: {exc}", allow_module_level=True)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from mpisign.cuda import aware, kernels, torch_check  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STEP = (0.9, 0.1 / 2.7, 0.99, 0.01 / 2.7)   # betas (0.9, 0.99) under a GradScaler's 1/2.7


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_torch_check_finds_the_forms():
    """Lion's kernel rounds in one of its forms as torch does here, and apply_decayed takes lr
    for every dtype; the forms are printed for the record (pytest -s)."""
    torch_check.check("cuda")
    form = torch_check.lion_form("cuda")
    lrs = {dtype: torch_check.decayed_lr("cuda", dtype, 0.01) for dtype in DTYPES}
    print(f"Lion's adds on {torch.cuda.get_device_name()}: {form}; apply_decayed lr: {lrs}")
    assert form in torch_check.FORMS
    assert None not in lrs.values()


@pytest.mark.parametrize("n", (1, 65, 4099, 1_000_003))
def test_lion_update_pack_equals_torch_on_the_device(n):
    """The kernel in the form torch_check found, bit for bit torch's ops on the device (signs,
    momentum, non-finite count); the other form differs here, so the check can tell them
    apart (where n is large enough that some coordinate rounds differently)."""
    form = torch_check.lion_form("cuda")
    g = special_floats(n, n).cuda()
    m0 = torch.randn(n, generator=torch.Generator().manual_seed(n + 1)).cuda()
    m0[~torch.isfinite(g) | (g == 0)] = 0.0   # c = 0 there: the zero bit
    for zero_bit in (0, 1):
        want_m = m0.clone()
        c = torch_check.torch_lion_step([g], [want_m], *STEP)[0]
        results = {}
        for fused in (True, False):
            m = m0.clone()
            words, count = kernels.lion_update_pack(g, m, *STEP, zero_bit, fused)
            results["fused" if fused else "separate"] = (words, m, int(count.item()))
        words, m, count = results[form]
        assert np.array_equal(words.cpu().numpy(), packing.pack_signs(c.cpu(), zero_bit))
        assert torch.equal(bits(m), bits(want_m))
        assert count == int((~torch.isfinite(g)).sum())
        other = results["separate" if form == "fused" else "fused"][1]
        if n > 100_000:
            assert not torch.equal(bits(other), bits(want_m))


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_decayed_equals_torch_on_the_device(dtype):
    n, m = 1_000_003, 4
    votes = np.stack([packing.pack_signs(special_floats(n, 7 + r), r % 2) for r in range(m)])
    plus, tie = packing.majority(packing.tally(votes), m, n)
    on_gpu = [torch.from_numpy(w.view(np.int64)).cuda() for w in (plus, tie)]
    p = special_floats(n, 99).to(dtype).cuda()
    v = packing.unpack_signs(plus, n, tie, dtype=dtype).cuda()
    for lr, decay in ((1e-3, 1 - 1e-3 * 0.1), (0.3, 0.5), (2.0 ** -7, 1.0)):
        want = torch_check.torch_apply_decayed(p.clone(), v, lr, decay)
        got = kernels.apply_decayed(p.clone(), *on_gpu, torch_check.decayed_lr("cuda", dtype, lr),
                                    decay)
        same = bits(got) == bits(want)
        assert bool(same.all()), (lr, decay, int((~same).sum()))


@pytest.mark.parametrize("aware_setting", ["1", "0"])
def test_lion_on_the_gpu_matches_the_cpu(monkeypatch, aware_setting):
    """mpisign.Lion on one rank: CUDA parameters (resident or staged words, the Lion kernels)
    against the same optimizer on CPU copies fed the same gradients, NaN and inf included.

    Where they may differ: float32 only is compared, since torch's CPU add rounds alpha to
    float16/bfloat16 and its CUDA add keeps it in float32 (torch_check.lr_as), so half
    parameters may part by a rounding; and the momentum's adds are one FMA or two roundings on
    each side (torch_check.lion_form here, native.momentum_form on the CPU): where the two
    differ, so may a sign now and then, and the test says so and skips."""
    import mpisign
    if not hasattr(mpisign, "Lion"):
        pytest.skip("mpisign.Lion is not there yet")
    from mpisign.cuda import bridge
    cpu_form = native.momentum_form(torch.float32) if native.available() else None
    if cpu_form is not None and cpu_form != torch_check.lion_form("cuda"):
        pytest.skip(f"torch's momentum adds round as {cpu_form} on the CPU and as "
                    f"{torch_check.lion_form('cuda')} here: CPU and GPU Lion may part")
    torch_check.check("cuda")   # its own launches before they are counted below
    monkeypatch.setenv(aware.OVERRIDE_ENV, aware_setting)
    monkeypatch.setattr(bridge, "_paths", {})
    launches = []
    real = kernels.lion_update_pack
    monkeypatch.setattr(kernels, "lion_update_pack",
                        lambda *a, **k: launches.append(1) or real(*a, **k))

    def train(device):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=gen).to(device).requires_grad_()
                  for shape in ((300, 200), (4099,), (1,))]
        opt = mpisign.Lion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        for _ in range(5):
            for p in params:
                g = special_floats(p.numel(), int(torch.randint(1 << 30, (1,), generator=gen)))
                p.grad = g.reshape(p.shape).to(device)
            opt.step()
        return [p.detach().cpu() for p in params], [opt.state[p]["exp_avg"].cpu() for p in params]

    on_cpu, m_cpu = train("cpu")
    on_gpu, m_gpu = train("cuda")
    assert launches, "Lion's fused kernel never ran on the GPU"
    for a, b in zip(on_cpu + m_cpu, on_gpu + m_gpu):
        assert torch.equal(bits(a), bits(b))
