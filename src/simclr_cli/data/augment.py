"""The SimCLR view pipeline as batched tensor operations.

Chen et al. 2020, https://arxiv.org/abs/2002.05709, appendix A: random resized crop with
horizontal flip, colour jitter (p=0.8) in random order, grayscale (p=0.2) and Gaussian blur
(p=0.5). Every image in the batch and every view draws its own parameters; the parameters
are drawn on the CPU from one generator, so a seed gives the same views on every device,
and the pixel work then runs where the batch lives (CPU, CUDA or MPS).

Inputs are uint8 canvases: each image decoded once, fitted inside a square of side
`decode_size(config)` and zero padded, with its valid (height, width) alongside. Crop and
flip are one `grid_sample` per batch that never reads the padding.

Limitation: the crop is resampled bilinearly without an anti-aliasing filter; with canvases
twice the training size a full-image crop is shrunk at most 2x, where aliasing is mild, but
it is not identical to PIL's antialiased resize that torchvision's transform uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from simclr_cli.config import AugmentConfig, blur_probability

__all__ = [
    "ViewParams",
    "apply_view",
    "blur_kernel_size",
    "center_view",
    "make_views",
    "normalize",
    "sample_view_params",
]

# ITU-R BT.601 luma weights, the ones PIL and torchvision use for grayscale.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class ViewParams:
    """Per-image random parameters of one view; every tensor has the batch as first dim."""

    crop_boxes: torch.Tensor  # (B, 4): x0, y0, width, height in canvas pixels
    flip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool: colour jitter applied at all
    brightness: torch.Tensor  # (B,) multiplicative factor
    contrast: torch.Tensor  # (B,) factor
    saturation: torch.Tensor  # (B,) factor
    hue: torch.Tensor  # (B,) shift, a fraction of the hue circle
    jitter_order: torch.Tensor  # (B, 4) permutation of brightness/contrast/saturation/hue
    grayscale: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    blur_sigma: torch.Tensor  # (B,) pixels

    def to(self, device: torch.device) -> ViewParams:
        """The same parameters on another device."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return ViewParams(**moved)


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of about 10% of the image (23 for 224 px, as in the paper)."""
    return 2 * round(0.05 * image_size) + 1


def sample_view_params(
    config: AugmentConfig, sizes: torch.Tensor, generator: torch.Generator
) -> ViewParams:
    """Draw the parameters of one view for each image.

    Args:
        config: The augmentation settings.
        sizes: Valid (height, width) of each canvas, (B, 2), on the CPU.
        generator: A CPU generator; the only source of randomness.
    """
    batch = sizes.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*(shape or (batch,)), generator=generator)

    def chance(prob: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator) < prob

    strength = config.jitter_strength
    crop_boxes = _sample_crop_boxes(config, sizes.float(), uniform)
    flip = chance(config.flip_prob)
    jitter = chance(config.jitter_prob)
    brightness = uniform(max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    contrast = uniform(max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    saturation = uniform(max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    hue = uniform(-0.2 * strength, 0.2 * strength)
    jitter_order = torch.rand(batch, 4, generator=generator).argsort(dim=1)
    grayscale = chance(config.grayscale_prob)
    blur = chance(blur_probability(config))
    blur_sigma = uniform(*config.blur_sigma)
    return ViewParams(
        crop_boxes,
        flip,
        jitter,
        brightness,
        contrast,
        saturation,
        hue,
        jitter_order,
        grayscale,
        blur,
        blur_sigma,
    )


def _sample_crop_boxes(
    config: AugmentConfig, sizes: torch.Tensor, draw: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """Random resized crop boxes in canvas pixels, (B, 4).

    Area and log-aspect are drawn uniformly and the first of 10 tries that fits is kept;
    where none fits, the whole image clipped to the aspect range, centred.
    """
    batch = sizes.shape[0]
    height, width = sizes[:, 0], sizes[:, 1]  # (B,)
    area = (height * width)[:, None] * draw(*config.crop_area, batch, _CROP_ATTEMPTS)
    log_low, log_high = math.log(config.crop_aspect[0]), math.log(config.crop_aspect[1])
    aspect = torch.exp(draw(log_low, log_high, batch, _CROP_ATTEMPTS))
    crop_w, crop_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # (B, tries)
    fits = (crop_w <= width[:, None]) & (crop_h <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # (B, 1): index of the first fit
    w = crop_w.gather(1, first).squeeze(1)
    h = crop_h.gather(1, first).squeeze(1)

    # Fallback where no try fitted: the whole image, clipped to the aspect range.
    image_aspect = width / height
    fallback_w = torch.where(
        image_aspect > config.crop_aspect[1], height * config.crop_aspect[1], width
    )
    fallback_h = torch.where(
        image_aspect < config.crop_aspect[0], width / config.crop_aspect[0], height
    )
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    x0 = torch.where(found, draw(0.0, 1.0) * (width - w), (width - w) / 2)
    y0 = torch.where(found, draw(0.0, 1.0) * (height - h), (height - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1)  # (B, 4)


def crop_and_flip(
    canvases: torch.Tensor, crop_boxes: torch.Tensor, flip: torch.Tensor, *, size: int
) -> torch.Tensor:
    """Resample each crop box to size x size (bilinear), mirrored where `flip` is set.

    Args:
        canvases: (B, 3, C, C) float images in [0, 1].
        crop_boxes: (B, 4) x0, y0, width, height in canvas pixels.
        flip: (B,) bool.
        size: Output side.
    """
    batch, _, canvas, _ = canvases.shape
    x0, y0, w, h = (crop_boxes.to(canvases.device, torch.float32) / canvas).unbind(1)
    # Output coordinate u in [-1, 1] maps to canvas coordinate (x0 + (u + 1) / 2 * w), which
    # in grid_sample's normalised units (align_corners=False) is w * u + (2 * x0 + w) - 1.
    sign = 1.0 - 2.0 * flip.to(canvases.device, torch.float32)
    theta = torch.zeros(batch, 2, 3, device=canvases.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(
        canvases, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _luma(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)  # (B, 1, H, W)


def _adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor[:, None, None, None]).clamp(0, 1)


def _adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (mean + (images - mean) * factor[:, None, None, None]).clamp(0, 1)


def _adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _luma(images)
    return (gray + (images - gray) * factor[:, None, None, None]).clamp(0, 1)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue in HSV space by `shift` (a fraction of the circle) per image."""
    red, green, blue = images.unbind(1)  # (B, H, W) each
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(
            value == green, 2 + (blue - red) / safe_chroma, 4 + (red - green) / safe_chroma
        ),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift[:, None, None], 1.0)

    # HSV to RGB: channel n is V - V*S*clamp(min(k, 4 - k), 0, 1) with k = (n + 6H) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype)
    k = torch.remainder(offsets[None, :, None, None] + 6 * hue[:, None], 6)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] - (value * saturation)[:, None] * ramp


_JITTER_OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)


def _color_jitter(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Apply the four adjustments in each image's own random order."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            selected = (params.jitter & (params.jitter_order[:, position] == op_index)).nonzero()
            if selected.numel() == 0:
                continue
            index = selected.squeeze(1)
            images[index] = op(images[index], factors[op_index][index])
    return images


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, as a grouped convolution."""
    batch, channels, height, width = images.shape
    kernel_size = blur_kernel_size(height)
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, batch * channels, height, width)
    # Reflect padding needs the image to be wider than the radius; tiny images replicate.
    mode = "reflect" if radius < min(height, width) else "replicate"
    flat = F.pad(flat, (radius, radius, radius, radius), mode=mode)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)  # along width
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)  # along height
    return flat.reshape(batch, channels, height, width)


def apply_view(canvases: torch.Tensor, params: ViewParams, config: AugmentConfig) -> torch.Tensor:
    """One augmented view per canvas, in [0, 1] (not yet normalised), (B, 3, S, S).

    Args:
        canvases: (B, 3, C, C) uint8 or float in [0, 1], on the compute device.
        params: Parameters from `sample_view_params`, on any device.
        config: The augmentation settings the parameters were drawn for.
    """
    params = params.to(canvases.device)
    if canvases.dtype == torch.uint8:
        canvases = canvases.float().div_(255)
    views = crop_and_flip(canvases, params.crop_boxes, params.flip, size=config.image_size)
    views = _color_jitter(views, params)
    gray = params.grayscale.nonzero().squeeze(1)
    if gray.numel():
        views[gray] = _luma(views[gray]).expand(-1, 3, -1, -1)
    blurred = params.blur.nonzero().squeeze(1)
    if blurred.numel():
        views[blurred] = _gaussian_blur(views[blurred], params.blur_sigma[blurred])
    return views


def normalize(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Subtract the channel mean and divide by the std the encoder expects."""
    mean = torch.tensor(config.mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(config.std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - mean) / std


def make_views(
    canvases: torch.Tensor, sizes: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented, normalised views of every image: (view_a, view_b)."""
    cpu_sizes = sizes.cpu()
    params_a = sample_view_params(config, cpu_sizes, generator)
    params_b = sample_view_params(config, cpu_sizes, generator)
    view_a = normalize(apply_view(canvases, params_a, config), config)
    view_b = normalize(apply_view(canvases, params_b, config), config)
    return view_a, view_b


def center_view(canvases: torch.Tensor, sizes: torch.Tensor, *, size: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to `size`, centre square, in [0, 1].

    Args:
        canvases: (B, 3, C, C) uint8 or float canvases on the compute device.
        sizes: Valid (height, width) of each canvas, (B, 2).
        size: Output side.
    """
    if canvases.dtype == torch.uint8:
        canvases = canvases.float().div_(255)
    sizes = sizes.to(torch.float32)
    side = sizes.min(dim=1).values  # (B,)
    x0 = (sizes[:, 1] - side) / 2
    y0 = (sizes[:, 0] - side) / 2
    boxes = torch.stack([x0, y0, side, side], dim=1)
    no_flip = torch.zeros(len(boxes), dtype=torch.bool)
    return crop_and_flip(canvases, boxes, no_flip, size=size)
