"""The SimCLR view pipeline as batched tensor operations.

Chen et al. 2020, https://arxiv.org/abs/2002.05709, appendix A: random resized crop with
horizontal flip, colour jitter (p=0.8) in random order, grayscale (p=0.2) and Gaussian blur
(p=0.5). Every image in the batch and every view draws its own parameters; the parameters
are drawn on the CPU from one generator, so a seed gives the same views on every device,
and the pixel work then runs where the batch lives (CPU, CUDA or MPS).

Inputs are uint8 canvases: each image decoded once, fitted inside a square of side
`decode_size(config)` and zero padded, with its valid (height, width) alongside. Crop and
flip are one `grid_sample` per batch (per chunk on the CPU) that never reads the padding.

Speed on the CPU, where these steps share cores with the model: canvases are converted to
float a chunk at a time (both views crop from the same chunk), and the batch is reordered so
that the images sharing one random order of the four colour adjustments are adjacent; each
such group of a few images then goes through jitter, grayscale and blur as one slice that
stays in cache. For two views of a batch of 256 on a 2-core EPYC this took 465 -> 282 ms
at 96 px and 4.3 -> 1.4 s at 224 px (medians of 10, `benchmarks/augment_speed.py`); the
pixels are those of before (each adjustment is checked against torchvision's, image by image).

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

    def take(self, rows: torch.Tensor | slice) -> ViewParams:
        """The parameters of some images only (an index tensor or a slice of the batch)."""
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


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
        canvases: (B, 3, C, C) float images, in [0, 1] or 0-255 (resampling is linear, so
            the scale can be applied afterwards, to fewer pixels).
        crop_boxes: (B, 4) x0, y0, width, height in canvas pixels.
        flip: (B,) bool.
        size: Output side.
    """
    batch, _, canvas, _ = canvases.shape
    device = canvases.device
    x0, y0, w, h = (crop_boxes.to(device, torch.float32) / canvas).unbind(1)
    # Output pixel centre u in (-1, 1) maps to canvas coordinate x0 + (u + 1) / 2 * w, which
    # in grid_sample's normalised units (align_corners=False) is w * u + (2 * x0 + w) - 1.
    # There is no rotation, so x depends on the column only and y on the row only: the grid
    # is built from two (B, S) vectors (affine_grid's general matrix product is slower).
    u = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1  # (S,)
    sign = 1.0 - 2.0 * flip.to(device, torch.float32)
    grid_x = (w * sign)[:, None] * u + (2 * x0 + w - 1)[:, None]  # (B, S)
    grid_y = h[:, None] * u + (2 * y0 + h - 1)[:, None]  # (B, S)
    shape = (batch, size, size)
    grid = torch.stack([grid_x[:, None, :].expand(shape), grid_y[:, :, None].expand(shape)], dim=3)
    return F.grid_sample(  # grid: (B, S, S, 2), (x, y) per output pixel
        canvases,
        grid.to(canvases.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel luma, (B, 1, H, W)."""
    red, green, blue = images.unbind(1)
    luma = red * _LUMA[0]
    luma.add_(green, alpha=_LUMA[1]).add_(blue, alpha=_LUMA[2])
    return luma.unsqueeze(1)


# The four adjustments work in place on their input and return it; each matches torchvision's
# single-image function (clamped to [0, 1] after every step, as there).


def _adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul_(factor[:, None, None, None]).clamp_(0, 1)


def _adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # The mean luma of an image is the luma of its channel means: one small reduction.
    weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
    mean = (images.mean(dim=(2, 3)) @ weights)[:, None, None, None]  # (B, 1, 1, 1)
    return images.sub_(mean).mul_(factor[:, None, None, None]).add_(mean).clamp_(0, 1)


def _adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _luma(images)
    return images.sub_(gray).mul_(factor[:, None, None, None]).add_(gray).clamp_(0, 1)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue in HSV space by `shift` (a fraction of the circle) per image.

    Turning the hue keeps each pixel's largest and smallest channel (HSV's value and
    saturation), so the result is written straight from max, chroma and the new hue: channel
    n = max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n_offset + 6 * hue) mod 6.
    """
    red, green, blue = images.unbind(1)  # (B, H, W) each
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    inverse = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    # Hue in sixths of the circle; for grey pixels (chroma 0) any hue gives the same output.
    sixths = torch.where(
        value == red,
        (green - blue).mul_(inverse),
        torch.where(
            value == green,
            (blue - red).mul_(inverse).add_(2),
            (red - green).mul_(inverse).add_(4),
        ),
    )
    sixths.add_(6 * shift[:, None, None])
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype)
    k = torch.remainder(offsets[None, :, None, None] + sixths[:, None], 6)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(value[:, None], chroma[:, None], ramp, value=-1, out=images)


_JITTER_OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
_NO_JITTER = 256  # above every key of an order of the four adjustments


def _jitter_group_keys(params: ViewParams) -> torch.Tensor:
    """(B,) one key per order of the four adjustments (its digits in base 4), or _NO_JITTER."""
    order = params.jitter_order
    key = order[:, 0] * 64 + order[:, 1] * 16 + order[:, 2] * 4 + order[:, 3]
    return torch.where(params.jitter, key, _NO_JITTER)


def _adjust_groups(views: torch.Tensor, params: ViewParams, keys: torch.Tensor) -> torch.Tensor:
    """Colour jitter (in each image's own order), grayscale and blur, in place.

    The views, the parameters (on the CPU) and their keys must be grouped: all images with
    one jitter order adjacent (see `_finish_view`). Each group, a few images, is then finished
    as one contiguous slice that stays in cache through every step, with no gather or scatter
    over the whole batch. Which steps run where is read from the CPU parameters, so a batch
    on a GPU is not synchronised once per group.
    """
    on_device = params.to(views.device)
    factors = (on_device.brightness, on_device.contrast, on_device.saturation, on_device.hue)
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    start = 0
    for count in counts.tolist():
        end = start + count
        group = views[start:end]
        if keys[start] != _NO_JITTER:
            for op_index in params.jitter_order[start].tolist():
                _JITTER_OPS[op_index](group, factors[op_index][start:end])
        gray = params.grayscale[start:end].nonzero().squeeze(1).to(views.device)
        if gray.numel():
            group[gray] = _luma(group[gray]).expand(-1, 3, -1, -1)
        blurred = params.blur[start:end].nonzero().squeeze(1).to(views.device)
        if blurred.numel():
            # Clamped because the kernel's weights may sum to 1 + a rounding error.
            blur_sigma = on_device.blur_sigma[start:end][blurred]
            group[blurred] = _gaussian_blur(group[blurred], blur_sigma).clamp_(0, 1)
        start = end
    return views


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
    (crops,) = _crop_views(canvases, [(params.crop_boxes, params.flip)], size=config.image_size)
    return _finish_view(crops, params)


# On the CPU, canvases are converted to float and cropped this many at a time: a float copy
# of a whole batch (113 MB for 256 canvases of 192 px) would be fresh memory on every step,
# and the page faults alone cost as much as the crop.
_CPU_CROP_CHUNK = 32


def _crop_views(
    canvases: torch.Tensor, boxes_and_flips: list[tuple[torch.Tensor, torch.Tensor]], *, size: int
) -> list[torch.Tensor]:
    """Crop and flip every canvas once per (crop_boxes, flip) pair: float views in [0, 1]."""
    batch = canvases.shape[0]
    if batch == 0:
        empty = torch.empty(0, 3, size, size, device=canvases.device)
        return [empty.clone() for _ in boxes_and_flips]
    chunk = _CPU_CROP_CHUNK if canvases.device.type == "cpu" else batch
    scale = 1 / 255 if canvases.dtype == torch.uint8 else 1.0
    buffer = None
    parts: list[list[torch.Tensor]] = [[] for _ in boxes_and_flips]
    for start in range(0, batch, chunk):
        end = min(start + chunk, batch)
        if canvases.dtype == torch.uint8:
            if buffer is None or buffer.shape[0] != end - start:
                buffer = torch.empty(canvases[start:end].shape, device=canvases.device)
            pixels = buffer.copy_(canvases[start:end])
        else:
            pixels = canvases[start:end]
        for view_parts, (boxes, flip) in zip(parts, boxes_and_flips, strict=True):
            view_parts.append(crop_and_flip(pixels, boxes[start:end], flip[start:end], size=size))
    views = [torch.cat(part) if len(part) > 1 else part[0] for part in parts]
    if scale != 1.0:
        for view in views:
            view.mul_(scale)
    return views


def _finish_view(crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Colour jitter, grayscale and blur on cropped views (batch order in and out).

    The batch is reordered so that images sharing a jitter order are adjacent, finished
    group by group, and put back in batch order.
    """
    host = params.to(torch.device("cpu"))
    keys = _jitter_group_keys(host)
    order = torch.argsort(keys, stable=True)
    restore = torch.argsort(order).to(crops.device)
    views = _adjust_groups(crops[order.to(crops.device)], host.take(order), keys[order])
    return views[restore]


def normalize(
    images: torch.Tensor, config: AugmentConfig, *, inplace: bool = False
) -> torch.Tensor:
    """Subtract the channel mean and divide by the std the encoder expects."""
    mean = torch.tensor(config.mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(config.std, device=images.device, dtype=images.dtype)[None, :, None, None]
    if inplace:
        return images.sub_(mean).div_(std)
    return (images - mean) / std


def make_views(
    canvases: torch.Tensor, sizes: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented, normalised views of every image: (view_a, view_b)."""
    cpu_sizes = sizes.cpu()
    params_a = sample_view_params(config, cpu_sizes, generator).to(canvases.device)
    params_b = sample_view_params(config, cpu_sizes, generator).to(canvases.device)
    # Both views crop from one float copy of each chunk of canvases.
    crops_a, crops_b = _crop_views(
        canvases,
        [(params_a.crop_boxes, params_a.flip), (params_b.crop_boxes, params_b.flip)],
        size=config.image_size,
    )
    view_a = normalize(_finish_view(crops_a, params_a), config, inplace=True)
    view_b = normalize(_finish_view(crops_b, params_b), config, inplace=True)
    return view_a, view_b


def center_view(canvases: torch.Tensor, sizes: torch.Tensor, *, size: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to `size`, centre square, in [0, 1].

    Args:
        canvases: (B, 3, C, C) uint8 or float canvases on the compute device.
        sizes: Valid (height, width) of each canvas, (B, 2).
        size: Output side.
    """
    sizes = sizes.to(torch.float32)
    side = sizes.min(dim=1).values  # (B,)
    x0 = (sizes[:, 1] - side) / 2
    y0 = (sizes[:, 0] - side) / 2
    boxes = torch.stack([x0, y0, side, side], dim=1)
    no_flip = torch.zeros(len(boxes), dtype=torch.bool)
    (view,) = _crop_views(canvases, [(boxes, no_flip)], size=size)
    return view
