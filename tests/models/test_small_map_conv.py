import copy

import pytest
import torch
from torch import nn

import simclr_cli.models.small_map_conv as small_map_conv
from conftest import standardised_photos
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.small_map_conv import SmallMapConv2d, weight_grad_by_matmul


def _reference_weight_grad(
    inputs: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """The weight gradient autograd gives for conv2d, in float64."""
    weight64 = weight.double().requires_grad_()
    output = nn.functional.conv2d(inputs.double(), weight64, stride=stride, padding=padding)
    output.backward(grad.double())
    assert weight64.grad is not None
    return weight64.grad


@pytest.mark.parametrize(
    ("channels", "out_channels", "size", "kernel", "stride", "padding"),
    [(8, 16, (4, 4), 3, 1, 1), (8, 16, (8, 6), 3, 2, 1), (8, 16, (8, 8), 1, 2, 0),
     (4, 6, (5, 7), 3, 1, 0), (3, 8, (12, 12), 7, 2, 3)],
)  # fmt: skip
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_matmul_weight_grad_is_the_convolution_weight_gradient(
    channels: int,
    out_channels: int,
    size: tuple[int, int],
    kernel: int,
    stride: int,
    padding: int,
    layout: torch.memory_format,
) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, channels, *size, generator=generator)
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator)
    out_size = nn.functional.conv2d(inputs, weight, stride=stride, padding=padding).shape
    grad = torch.randn(out_size, generator=generator)
    want = _reference_weight_grad(inputs, weight, grad, stride, padding)

    got = weight_grad_by_matmul(
        grad.contiguous(memory_format=layout),
        inputs.contiguous(memory_format=layout),
        (kernel, kernel),
        (stride, stride),
        (padding, padding),
    )
    assert got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)

    # In bf16 only the rounding of inputs and output separates it from the exact gradient.
    got_bf16 = weight_grad_by_matmul(
        grad.bfloat16(), inputs.bfloat16(), (kernel, kernel), (stride, stride), (padding, padding)
    )
    assert got_bf16.dtype == torch.bfloat16
    assert (got_bf16.double() - want).abs().max() <= 2e-2 * want.abs().max()


class _CountingMatmul:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        return weight_grad_by_matmul(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def matmul_calls(monkeypatch: pytest.MonkeyPatch) -> _CountingMatmul:
    counter = _CountingMatmul()
    monkeypatch.setattr(small_map_conv, "weight_grad_by_matmul", counter)
    return counter


def _conv_pair() -> tuple[nn.Conv2d, SmallMapConv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False)
    fast = SmallMapConv2d(16, 32, kernel_size=3, padding=1, bias=False)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("side", [1, 4, 6])  # 6x6 = 36 positions, the largest map taken
def test_small_maps_in_bf16_take_the_matmul_path_with_the_same_results(
    side: int, matmul_calls: _CountingMatmul
) -> None:
    plain, fast = _conv_pair()
    inputs = torch.randn(8, 16, side, side, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for conv in (plain, fast):
        x = inputs.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
        outputs.append(y)
        grads.append((x.grad, conv.weight.grad))
    assert matmul_calls.calls == 1
    assert outputs[1].dtype == torch.bfloat16
    assert torch.equal(outputs[0], outputs[1])  # the forward is oneDNN's either way
    (plain_x, plain_w), (fast_x, fast_w) = grads
    assert plain_x is not None and fast_x is not None and plain_w is not None and fast_w is not None
    assert torch.equal(plain_x, fast_x)  # so is the input gradient
    assert fast_w.dtype == torch.float32  # the parameter's own dtype, as autocast gives it
    assert (fast_w - plain_w).abs().max() <= 1e-2 * plain_w.abs().max()


@pytest.mark.parametrize(
    "case", ["fp32", "no grad", "frozen weight", "large map", "bias", "dilation"]
)
def test_everything_else_is_plain_conv2d(case: str, matmul_calls: _CountingMatmul) -> None:
    kwargs = {"bias": {"bias": True}, "dilation": {"dilation": 2, "padding": 2}}.get(case, {})
    torch.manual_seed(0)
    options: dict[str, object] = {"padding": 1, "bias": False, **kwargs}
    plain = nn.Conv2d(16, 32, kernel_size=3, **options)  # type: ignore[arg-type]
    fast = SmallMapConv2d(16, 32, kernel_size=3, **options)  # type: ignore[arg-type]
    fast.load_state_dict(plain.state_dict())
    if case == "frozen weight":
        plain.weight.requires_grad_(False)
        fast.weight.requires_grad_(False)
    side = 7 if case == "large map" else 4  # 49 positions against at most 36
    inputs = torch.randn(4, 16, side, side, generator=torch.Generator().manual_seed(1))
    results = []
    for conv in (plain, fast):
        x = inputs.clone().requires_grad_()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "fp32"),
            torch.set_grad_enabled(case != "no grad"),
        ):
            y = conv(x)
        if y.requires_grad:
            y.float().sum().backward()
        results.append((y, conv.weight.grad))
    assert matmul_calls.calls == 0
    assert torch.equal(results[0][0], results[1][0])
    if results[0][1] is not None:
        assert torch.equal(results[0][1], results[1][1])


def test_a_backbone_trains_its_last_stage_through_the_matmul_path(
    matmul_calls: _CountingMatmul,
) -> None:
    torch.manual_seed(0)
    backbone = Backbone("resnet18", small_stem=True).to(memory_format=torch.channels_last)
    assert all(type(m) is not nn.Conv2d for m in backbone.modules())
    oneDNN_only = copy.deepcopy(backbone)
    for module in oneDNN_only.modules():
        if type(module) is SmallMapConv2d:
            module.__class__ = nn.Conv2d
    assert backbone.state_dict().keys() == oneDNN_only.state_dict().keys()

    images = standardised_photos(32).contiguous(
        memory_format=torch.channels_last
    )  # the last stage runs at 4x4
    for model in (oneDNN_only, backbone):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(images)
        features.float().square().mean().backward()
    # layer4: two 3x3 convolutions in each of its two blocks, and the 1x1 shortcut.
    assert matmul_calls.calls == 5

    for (name, want), got in zip(
        oneDNN_only.named_parameters(), backbone.parameters(), strict=True
    ):
        assert want.grad is not None and got.grad is not None
        in_layer4_conv = name.startswith("resnet.layer4.") and (
            ".conv" in name or ".downsample.0." in name
        )
        if in_layer4_conv:
            assert (got.grad - want.grad).abs().max() <= 1e-2 * want.grad.abs().max(), name
        else:
            assert torch.equal(got.grad, want.grad), name
