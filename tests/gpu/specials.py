"""What the GPU tests feed the kernels: normal floats with zeros of both signs, NaN, infinities
and subnormals mixed in."""

import torch


def special_floats(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40])
    pick = torch.randint(0, 10 * len(specials), (n,), generator=gen)
    x[pick < len(specials)] = specials[pick[pick < len(specials)]]
    return x
