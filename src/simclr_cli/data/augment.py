"""The SimCLR view pipeline as batched tensor operations.

Chen et al. 2020, https://arxiv.org/abs/2002.05709, appendix A: random resized crop with
horizontal flip, colour jitter (p=0.8) in random order, grayscale (p=0.2) and Gaussian blur
(p=0.5). Every image in the batch and every view draws its own parameters; the parameters
are drawn on the CPU from one generator, so a seed gives the same views on every device,
and the pixel work then runs where the batch lives (CPU, CUDA or MPS).

Inputs are uint8 canvases: each image decoded once, fitted inside a square of side
`decode_size(config)` and zero padded, with its valid (height, width) alongside. Crop and
flip are one `grid_sample` per batch (per chunk on the CPU) whose samples stay inside each
crop box, so the padding is never read.

Speed on the CPU, where these steps share cores with the model:
- Canvases are converted to float a chunk at a time, and both views crop from the same chunk.
- The crops of both views are written straight into one batch, sorted so that the images
  sharing one random order of the four colour adjustments are adjacent. Inside such a
  group, the images to be grayed and those to be blurred are each one slice.
- Each group, cut into pieces of at most 2 MiB, goes through jitter, grayscale, blur,
  normalisation and conversion to channels-last while it stays in cache. It is then copied
  to its rows of the step's input (`make_view_batch`).

Measured with `benchmarks/augment_speed.py`, two views of a batch of 256, medians of 10:
- 2-core EPYC: grouping took 465 -> 282 ms at 96 px and 4.3 -> 1.4 s at 224 px.
- 2-core AMX Xeon: the matrix-product blur, its subnormal fix, the slices and the single
  batch took 184 -> 118 ms at 96 px. Made in line in a bf16 training step, they took
  197 -> 126 ms.
Each step is checked against torchvision's, image by image.

Limitation: the crop is resampled bilinearly without an anti-aliasing filter; with canvases
twice the training size a full-image crop is shrunk at most 2x, where aliasing is mild, but
it is not identical to PIL's antialiased resize that torchvision's transform uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from simclr_cli.config import AugmentConfig, blur_probability

__all__ = [
    "ViewParams",
    "apply_view",
    "blur_kernel_size",
    "center_view",
    "make_view_batch",
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

    def cat(self, other: ViewParams) -> ViewParams:
        """These images' parameters followed by `other`'s, as one batch."""
        return ViewParams(
            **{
                f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
                for f in fields(self)
            }
        )


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
    grid_x = _inside_box((w * sign)[:, None] * u + (2 * x0 + w - 1)[:, None], x0, w, canvas)
    grid_y = _inside_box(h[:, None] * u + (2 * y0 + h - 1)[:, None], y0, h, canvas)
    shape = (batch, size, size)
    grid = torch.stack([grid_x[:, None, :].expand(shape), grid_y[:, :, None].expand(shape)], dim=3)
    return F.grid_sample(  # grid: (B, S, S, 2), (x, y) per output pixel
        canvases,
        grid.to(canvases.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def _inside_box(
    coords: torch.Tensor, start: torch.Tensor, length: torch.Tensor, canvas: int
) -> torch.Tensor:
    """Sample positions (B, S), normalised, clamped to the box's first and last pixel centres.

    An enlarged crop's outermost samples fall less than half a pixel outside the box, where
    bilinear sampling would mix in the next pixel: the zero padding, for a box at the edge
    of an image (a 2 px wide image enlarged to 96 px lost a quarter of its width to a dark
    band). Clamping repeats the box's edge pixels instead, as cutting the box out and then
    resizing it does in torchvision. Shrunk crops never sample that far out and are unchanged.
    """
    centre = 2 * start + length - 1  # (B,), normalised
    reach = (length - 1 / canvas).clamp(min=0)  # centre to the outermost pixel centre
    return coords.clamp(min=(centre - reach)[:, None], max=(centre + reach)[:, None])


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


# Where each channel's trapezoid (below) is centred, in sixths of the hue circle: red, green,
# blue.
_HUE_CENTRES = (3.0, 5.0, 1.0)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue in HSV space by `shift` (a fraction of the circle) per image.

    Turning the hue keeps each pixel's largest channel (HSV's value) and its spread (chroma),
    so the result is written straight from them and the new hue h, in sixths of the circle:
    channel n = value - chroma * clamp(a_n - 1, 0, 1), where a_n = ||h - c_n| - 3| is the
    distance around the circle from h to the point opposite the channel's centre c_n
    (`_HUE_CENTRES`). That is HSV-to-RGB conversion's clamp(min(k, 4 - k), 0, 1) with
    k = (offset + h) mod 6, but h is wrapped once, on one channel, instead of once per
    channel: 1.1 ms instead of 1.6 for 18 images of 96 px on a 2-core EPYC (ad hoc timing).
    """
    red, green, blue = images.unbind(1)  # (B, H, W) each
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    # Hue in sixths of the circle from the largest channel. Grey pixels (chroma 0) get 0 over
    # the smallest positive float: any hue gives them the same output.
    sixths = torch.where(
        value == red,
        green - blue,
        torch.where(
            value == green,
            (blue - red).add_(chroma, alpha=2),
            (red - green).add_(chroma, alpha=4),
        ),
    )
    sixths.div_(chroma.clamp(min=torch.finfo(images.dtype).tiny))
    sixths.add_(6 * shift[:, None, None])
    turned = torch.remainder(sixths, 6)[:, None]  # (B, 1, H, W) in [0, 6)
    centres = torch.tensor(_HUE_CENTRES, device=images.device, dtype=images.dtype)
    # a_n clamped to [1, 2]: value + chroma - chroma * that is the formula above, one pass
    # shorter.
    opposite = (turned - centres[None, :, None, None]).abs_().sub_(3).abs_().clamp_(1, 2)
    top = (value + chroma)[:, None]
    return torch.addcmul(top, chroma[:, None], opposite, value=-1, out=images)


_JITTER_OPS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
_NO_JITTER = 256  # above every key of an order of the four adjustments


def _jitter_group_keys(params: ViewParams) -> torch.Tensor:
    """(B,) one key per order of the four adjustments (its digits in base 4), or _NO_JITTER."""
    order = params.jitter_order
    key = order[:, 0] * 64 + order[:, 1] * 16 + order[:, 2] * 4 + order[:, 3]
    return torch.where(params.jitter, key, _NO_JITTER)


# Within a group, images are ordered by what follows the jitter: neither, blur only, grayscale
# and blur, grayscale only. The grayscale images and the blurred ones are then each one slice.
_PLAIN, _BLUR_ONLY, _GRAY_AND_BLUR, _GRAY_ONLY = range(4)


def _finish_keys(params: ViewParams) -> torch.Tensor:
    """(B,) one of the four orders above per image, from its grayscale and blur flags."""
    blur = params.blur.long()
    return torch.where(params.grayscale, _GRAY_ONLY - blur, blur)


@dataclass(frozen=True)
class _GroupPlan:
    """How one view's batch is finished group by group, all on the CPU.

    `order` sorts the batch by (jitter order, finish key): row p of the sorted batch is image
    order[p]. Each group is one jitter order; inside it, `plain`, `blur_only` and
    `gray_and_blur` count the images of the first three finish keys (the rest are grayscale
    only), so the grayscale images and the blurred ones are each a contiguous slice.
    """

    order: torch.Tensor  # (B,) long
    params: ViewParams  # sorted by `order`
    sizes: list[int]  # images per group, in sorted order
    plain: list[int]
    blur_only: list[int]
    gray_and_blur: list[int]


# Groups are cut into pieces whose float pixels take at most this many bytes, so that a piece
# stays in cache through all its steps. Two views of a batch of 256 on the AMX Xeon, per
# bound: 1 MiB 140 / 944 ms at 96 / 224 px, 2 MiB 123 / 826, 4 MiB 127 / 848, uncut 130 / 917.
_GROUP_BYTES = 2 << 20


def _max_group(image_size: int, device: torch.device) -> int | None:
    """Most images of this side in one piece of a group (float32, 3 channels); None: uncut.

    Only the CPU cuts groups. On a GPU every operation is a kernel launch whatever its size,
    so pieces would only add launches (about 170 pieces instead of 25 groups per step at
    224 px).
    """
    if device.type != "cpu":
        return None
    return max(1, _GROUP_BYTES // (3 * image_size * image_size * 4))


def _group_plan(params: ViewParams, max_group: int | None = None) -> _GroupPlan:
    """Sort the batch into groups that share a jitter order, of at most `max_group` images."""
    host = params.to(torch.device("cpu"))
    keys = _jitter_group_keys(host)
    finish_keys = _finish_keys(host)
    order = torch.argsort(keys * 4 + finish_keys, stable=True)
    keys, finish_keys = keys[order], finish_keys[order]
    if max_group is not None and len(keys):
        # Split long groups into consecutive pieces; each piece stays sorted by finish key.
        _, group_of_row, counts = torch.unique_consecutive(
            keys, return_inverse=True, return_counts=True
        )
        group_start = torch.cumsum(counts, 0) - counts
        piece = (torch.arange(len(keys)) - group_start[group_of_row]) // max_group
        keys = group_of_row * len(keys) + piece
    _, group_of_row, sizes = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
    per_finish = torch.zeros(len(sizes), 4, dtype=torch.long)
    per_finish.index_put_((group_of_row, finish_keys), torch.ones_like(keys), accumulate=True)
    return _GroupPlan(
        order=order,
        params=host.take(order),
        sizes=sizes.tolist(),
        plain=per_finish[:, _PLAIN].tolist(),
        blur_only=per_finish[:, _BLUR_ONLY].tolist(),
        gray_and_blur=per_finish[:, _GRAY_AND_BLUR].tolist(),
    )


def _finish_groups(
    crops: torch.Tensor,
    plan: _GroupPlan,
    config: AugmentConfig | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Colour jitter (in each image's own order), grayscale and blur: views in batch order.

    `crops` must already be in the plan's sorted order (see `_crop_views`). Each group, a few
    images, is finished as slices that stay in cache through every step, normalised for the
    encoder when `config` is given, and copied to its images' rows of the result (laid out
    in `memory_format`), so the batch is never gathered, scattered or converted as a whole.
    Which steps run where is read from the CPU plan, so a batch on a GPU is not synchronised
    once per group.
    """
    params = plan.params
    on_device = params.to(crops.device)
    factors = (on_device.brightness, on_device.contrast, on_device.saturation, on_device.hue)
    rows = plan.order.to(crops.device)
    views = torch.empty_like(crops, memory_format=memory_format)
    start = 0
    for size, plain, blur_only, gray_and_blur in zip(
        plan.sizes, plan.plain, plan.blur_only, plan.gray_and_blur, strict=True
    ):
        end = start + size
        group = crops[start:end]
        if params.jitter[start]:
            for op_index in params.jitter_order[start].tolist():
                _JITTER_OPS[op_index](group, factors[op_index][start:end])
        gray = group[plain + blur_only :]
        if len(gray):
            gray.copy_(_luma(gray).expand(-1, 3, -1, -1))
        blurred = group[plain : plain + blur_only + gray_and_blur]
        if len(blurred):
            sigma = on_device.blur_sigma[start + plain : start + plain + len(blurred)]
            # Clamped because the kernel's weights may sum to 1 + a rounding error.
            blurred.copy_(_gaussian_blur(blurred, sigma).clamp_(0, 1))
        if config is not None:
            normalize(group, config, inplace=True)
        # Converted to the result's layout while the group is in cache: copying rows of the
        # same layout into the result is then 2.6x faster than converting there.
        views[rows[start:end]] = group.contiguous(memory_format=memory_format)
        start = end
    return views


# Gaussian weights smaller than this (the centre tap being 1 before normalising) are set to 0.
# Left in, the ones that fall below float32's normal range make every product with them
# subnormal, which x86 computes 10-20x slower: for sigmas near 0.21, 0.29 or 0.36 px the
# blur of a batch took 230 ms instead of 13. That is 4.7% of the sigmas drawn (0.1-2.0 px)
# at 96 px and 21.6% at 224 px. What is dropped changes no output by 1e-20.
_BLUR_WEIGHT_FLOOR = 1e-20


def _blur_matrices(sigma: torch.Tensor, size: int, kernel_size: int) -> torch.Tensor:
    """One blur pass per image as a (size, size) matrix: (B, size, size).

    Row i holds the Gaussian weights that output pixel i takes from each input pixel, with
    the border mirrored (replicated when the radius reaches past the far side, as it can in
    tiny images).
    """
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (B, K)
    weights = torch.where(weights < _BLUR_WEIGHT_FLOOR, 0.0, weights)
    weights = weights / weights.sum(dim=1, keepdim=True)
    source = torch.arange(size, device=sigma.device)[:, None] + taps[None, :].long()  # (S, K)
    if radius < size:
        source = source.abs()
        source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    else:
        source = source.clamp(0, size - 1)
    batch = sigma.shape[0]
    matrices = torch.zeros(batch, size, size, device=sigma.device, dtype=sigma.dtype)
    shape = (batch, size, kernel_size)
    return matrices.scatter_add_(2, source.expand(shape), weights[:, None, :].expand(shape))


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, as two batched matrix products.

    Each pass multiplies by a banded (side x side) matrix, which does side / kernel_size times
    the arithmetic of a convolution, yet on the CPU it ran 1.1-2.6x faster than the grouped
    convolution for 4-16 images of 32-224 px (one BLAS call instead of one tiny convolution
    per channel), and it is one code path on every device.
    """
    batch, channels, height, width = images.shape
    kernel_size = blur_kernel_size(height)
    sigma = sigma.to(images.dtype)
    along_width = _blur_matrices(sigma, width, kernel_size)
    along_height = along_width if height == width else _blur_matrices(sigma, height, kernel_size)
    rows = torch.bmm(images.reshape(batch, channels * height, width), along_width.transpose(1, 2))
    per_channel = along_height[:, None].expand(batch, channels, height, height)
    out = torch.bmm(
        per_channel.reshape(batch * channels, height, height),
        rows.view(batch * channels, height, width),
    )
    return out.view(batch, channels, height, width)


def apply_view(canvases: torch.Tensor, params: ViewParams, config: AugmentConfig) -> torch.Tensor:
    """One augmented view per canvas, in [0, 1] (not yet normalised), (B, 3, S, S).

    Args:
        canvases: (B, 3, C, C) uint8 or float in [0, 1], on the compute device.
        params: Parameters from `sample_view_params`, on any device.
        config: The augmentation settings the parameters were drawn for.
    """
    plan = _group_plan(params, max_group=_max_group(config.image_size, canvases.device))
    params = params.to(canvases.device)
    crops = _sorted_crops(canvases, [params], plan, size=config.image_size)
    return _finish_groups(crops, plan)


def _sorted_crops(
    canvases: torch.Tensor, views: list[ViewParams], plan: _GroupPlan, *, size: int
) -> torch.Tensor:
    """Every view's crops of the canvases, stacked view after view, in the plan's order.

    Image i of view v is row v * B + i of the stacked batch the plan sorts; each chunk's
    crops are copied straight to their sorted rows, so the batch is not gathered afterwards.
    """
    batch = canvases.shape[0]
    stacked = torch.empty(len(views) * batch, 3, size, size, device=canvases.device)
    sorted_row = torch.argsort(plan.order).to(canvases.device)  # stacked row -> sorted row
    crops = [
        (params.crop_boxes, params.flip, sorted_row[v * batch : (v + 1) * batch])
        for v, params in enumerate(views)
    ]
    _crop_views(canvases, crops, size=size, out=stacked)
    return stacked


# On the CPU, canvases are converted to float and cropped this many at a time: a float copy
# of a whole batch (113 MB for 256 canvases of 192 px) would be fresh memory on every step,
# and the page faults alone cost as much as the crop.
_CPU_CROP_CHUNK = 32


def _crop_views(
    canvases: torch.Tensor,
    crops: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    *,
    size: int,
    out: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Crop and flip every canvas once per (crop_boxes, flip, rows): float views in [0, 1].

    Without `out`, each pair gets its own (B, 3, S, S) tensor in canvas order. With `out`,
    canvas i's crop of each pair is written to out[rows[i]] (one tensor for all pairs).
    Both ways, all pairs crop from one float copy of each chunk of canvases.
    """
    batch = canvases.shape[0]
    device = canvases.device
    if out is None:
        targets = [torch.empty(batch, 3, size, size, device=device) for _ in crops]
    else:
        targets = [out] * len(crops)
    chunk = _CPU_CROP_CHUNK if device.type == "cpu" else max(batch, 1)
    scale = 1 / 255 if canvases.dtype == torch.uint8 else 1.0
    buffer = None
    for start in range(0, batch, chunk):
        end = min(start + chunk, batch)
        if canvases.dtype == torch.uint8:
            if buffer is None or buffer.shape[0] != end - start:
                buffer = torch.empty(canvases[start:end].shape, device=device)
            pixels = buffer.copy_(canvases[start:end])
        else:
            pixels = canvases[start:end]
        for target, (boxes, flip, rows) in zip(targets, crops, strict=True):
            crop = crop_and_flip(pixels, boxes[start:end], flip[start:end], size=size)
            if scale != 1.0:
                crop.mul_(scale)
            if rows is None:
                target[start:end] = crop
            else:
                target[rows[start:end]] = crop
    return targets if out is None else [out]


def normalize(
    images: torch.Tensor, config: AugmentConfig, *, inplace: bool = False
) -> torch.Tensor:
    """Subtract the channel mean and divide by the std the encoder expects."""
    mean = torch.tensor(config.mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(config.std, device=images.device, dtype=images.dtype)[None, :, None, None]
    if inplace:
        return images.sub_(mean).div_(std)
    return (images - mean) / std


def make_view_batch(
    canvases: torch.Tensor, sizes: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Two independently augmented, normalised views of every image, as the encoder's input.

    Returns (2B, 3, S, S) in channels-last layout: rows 0..B-1 are the first view of each
    image, rows B..2B-1 the second. Both views are finished as one batch: twice as many
    images per jitter group means half as many small operations per image, and the result is
    written in place of a later concatenation and layout conversion.
    """
    cpu_sizes = sizes.cpu()
    params_a = sample_view_params(config, cpu_sizes, generator)
    params_b = sample_view_params(config, cpu_sizes, generator)
    plan = _group_plan(
        params_a.cat(params_b), max_group=_max_group(config.image_size, canvases.device)
    )
    crops = _sorted_crops(canvases, [params_a, params_b], plan, size=config.image_size)
    return _finish_groups(crops, plan, config, memory_format=torch.channels_last)


def make_views(
    canvases: torch.Tensor, sizes: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented, normalised views of every image: (view_a, view_b).

    The two halves of `make_view_batch` (the same pixels, drawn the same way).
    """
    views = make_view_batch(canvases, sizes, config, generator)
    half = views.shape[0] // 2
    return views[:half], views[half:]


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
    (view,) = _crop_views(canvases, [(boxes, no_flip, None)], size=size)
    return view
