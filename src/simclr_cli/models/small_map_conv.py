"""Convolutions whose weight gradient on small feature maps is one matrix product (CPU, bf16).

Under bf16 autocast on a CPU, autograd asks oneDNN for each convolution's weight gradient.
On a 2-core Xeon with AMX (torch 2.14.1, 512 views per batch) that kernel ran 1.5-8.9x
slower than the same gradient computed as the output gradient times the unfolded input,
for every ResNet-18 and ResNet-50 convolution whose output is 6x6 or smaller: the last stage
at 32 px with the small stem, the last two at 96 px with the standard one. A ResNet-18 3x3
512-channel layer at 4x4 took 148 ms there against 37. At 8x8 the two were about even
(0.87-1.12x for 3x3 layers), and on 3x3 layers from 12x12 up oneDNN was 1.8-6.2x faster, so
larger maps keep oneDNN's kernel. `benchmarks/conv_weight_grad.py` times every layer both
ways, so the rule can be checked on another CPU.

On a 2-core AMD Zen 4 EPYC (AVX512-BF16, no AMX; record conv-weight-grad-zen4.json)
oneDNN's kernel does much better on small maps, and the same rule gains little: stride-1
3x3 layers at 4x4 and 6x6 lost (0.76-0.92x), as did ResNet-18's 1x1 shortcut at 6x6 (0.76x,
1.4 ms), while every other layer on the path gained 1.01-2.45x, stride-2 layers and 3x3
maps the most. Summed over the layers the path takes, it saved 6 ms of a 4.2 s ResNet-18
step at 32 px, 74 ms of 2.6 s at 96 px, and 171 and 234 ms per step on ResNet-50. Whole
ResNet-18 steps timed 0.98x at 32 px and 1.01x at 96 px, within their noise. The rule is
the same on every CPU: leaving the losing layers to oneDNN on such CPUs would save at most
25-84 ms more per step there (the layer timings), a few percent.

fp32 keeps oneDNN's kernel everywhere: on the same Xeon the product was only 1.04-1.9x
faster per layer at 4x4 and 3x3 and 0.75-1.14x at 6x6 (about 110 ms of a 5.9 s fp32 step at
32 px, from the layer timings), and on the Zen 4 EPYC it was 0.63-1.21x at 6x6 and less,
slower on most of those layers.

The product is the gradient itself, not an approximation: the sum over every image and
output position of the output gradient times the input patch. Both ways take the same bf16
inputs and accumulate in fp32; the results differ by the bf16 rounding of the output (at most
4.7e-3 of the largest entry in the layers timed, where one bf16 step at that magnitude is
3.9e-3 to 7.8e-3 of it). The forward pass and the input gradient stay oneDNN's, bit for
bit. The unfolded input is a temporary copy of kH x kW x C_in values per output position
(kH x kW times the layer's input at stride 1; 85 MB for a ResNet-18's third stage at 96 px
and batch 256 in bf16), small beside the activations a training step keeps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["SMALL_MAP_POSITIONS", "SmallMapConv2d", "use_small_map_convs", "weight_grad_by_matmul"]

# Output positions (height x width) up to which the weight gradient is a matrix product:
# 6x6, the largest size at which every ResNet-18/50 layer measured was faster that way.
SMALL_MAP_POSITIONS = 36


def weight_grad_by_matmul(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """The weight gradient of a plain convolution (no groups, no dilation) as one product.

    Args:
        grad_output: (N, C_out, H_out, W_out), the gradient of the convolution's output.
        inputs: (N, C_in, H, W), the convolution's input.
        kernel_size: The convolution's (height, width) kernel.
        stride: Its (height, width) stride.
        padding: Its (height, width) zero padding.

    Returns:
        (C_out, C_in, kH, kW) in channels-last layout, dtype of the inputs.
    """
    batch, channels = inputs.shape[:2]
    out_channels, out_h, out_w = grad_output.shape[1:]
    k_h, k_w = kernel_size
    # Channels last: each patch row below is then (kH, kW, C_in) with C_in innermost, the
    # layout a channels-last weight has in memory, so no reorder is needed at the end.
    nhwc = inputs.permute(0, 2, 3, 1)
    if padding != (0, 0):
        nhwc = F.pad(nhwc, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    s_n, s_h, s_w, s_c = nhwc.stride()
    windows = nhwc.as_strided(
        (batch, out_h, out_w, k_h, k_w, channels),
        (s_n, s_h * stride[0], s_w * stride[1], s_h, s_w, s_c),
        nhwc.storage_offset(),
    )
    patches = windows.reshape(batch * out_h * out_w, k_h * k_w * channels)  # a copy
    # (C_out, positions), contiguous: the product runs fastest with both operands row-major.
    grads = grad_output.permute(1, 0, 2, 3).reshape(out_channels, batch * out_h * out_w)
    weight_grad = grads @ patches  # (C_out, kH * kW * C_in)
    return weight_grad.view(out_channels, k_h, k_w, channels).permute(0, 3, 1, 2)


class _SmallMapConvolution(torch.autograd.Function):
    """conv2d with oneDNN's forward and input gradient, and the weight gradient by matmul."""

    @staticmethod
    def forward(
        ctx: Any,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(inputs, weight, None, stride, padding)

    @staticmethod
    @once_differentiable  # nothing here needs a second derivative
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        inputs, weight = ctx.saved_tensors
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output,
                inputs,
                weight,
                None,
                list(ctx.stride),
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad_by_matmul(
                grad_output, inputs, tuple(weight.shape[2:]), ctx.stride, ctx.padding
            )
        return grad_input, grad_weight, None, None


def _bf16_autocast_on_cpu() -> bool:
    try:
        enabled = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
    except TypeError:  # torch < 2.4 names these per device
        enabled = torch.is_autocast_cpu_enabled()
        dtype = torch.get_autocast_cpu_dtype()
    return bool(enabled) and dtype == torch.bfloat16


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that trains faster in bf16 on a CPU when its output map is small.

    Same parameters, state dict and forward result as nn.Conv2d. Only the weight gradient
    changes how it is computed, and only while training under bf16 autocast on a CPU with
    an output of at most SMALL_MAP_POSITIONS positions; everything else is nn.Conv2d's.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Conv2d's name)
        """nn.Conv2d's result; see the class for when the backward differs."""
        if self._takes_matmul_path(input):
            stride = (int(self.stride[0]), int(self.stride[1]))
            padding = self.padding
            assert isinstance(padding, tuple)  # checked in _takes_matmul_path
            return _SmallMapConvolution.apply(  # type: ignore[no-any-return]
                input.to(torch.bfloat16),
                self.weight.to(torch.bfloat16),
                stride,
                (int(padding[0]), int(padding[1])),
            )
        return super().forward(input)

    def _takes_matmul_path(self, input: torch.Tensor) -> bool:  # noqa: A002
        if not (
            input.device.type == "cpu"
            and input.dim() == 4
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and self.bias is None
            and self.groups == 1
            and tuple(self.dilation) == (1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and _bf16_autocast_on_cpu()
        ):
            return False
        (k_h, k_w), (s_h, s_w), (p_h, p_w) = self.kernel_size, self.stride, self.padding
        out_h = (input.shape[2] + 2 * p_h - k_h) // s_h + 1
        out_w = (input.shape[3] + 2 * p_w - k_w) // s_w + 1
        return 0 < out_h * out_w <= SMALL_MAP_POSITIONS


def use_small_map_convs(module: nn.Module) -> int:
    """Turn every plain nn.Conv2d inside `module` into a SmallMapConv2d, in place.

    The parameters are kept (the same tensors), so state dicts, optimisers and checkpoints
    see no change. Returns how many convolutions were turned.
    """
    turned = 0
    for sub in module.modules():
        if type(sub) is nn.Conv2d:
            # Same class layout and attributes, so only the forward changes.
            sub.__class__ = SmallMapConv2d
            turned += 1
    return turned
