"""mpisign.train.models: every model takes the data sets' image shapes; nothing is downloaded."""

import pytest
import torch

from mpisign.train.models import MODELS, build_model, count_parameters


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_output_shape(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)


def test_imagenet_sized_resnet_keeps_its_stem():
    model = build_model("resnet18", 3, 1000, 224)
    assert model.conv1.kernel_size == (7, 7) and count_parameters(model) == 11689512


def test_small_cnn_sizes():
    assert count_parameters(build_model("cnn", 1, 10, 8)) == 53002
    assert count_parameters(build_model("cnn", 1, 10, 28)) == 421642


def test_same_seed_same_model():
    torch.manual_seed(1)
    a = build_model("cnn", 1, 10, 28)
    torch.manual_seed(1)
    b = build_model("cnn", 1, 10, 28)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values()))


def test_unknown_model():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 1, 10, 28)
