import math
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from skimage import data as skdata

from simclr_cli.config import AugmentConfig
from simclr_cli.data import augment
from simclr_cli.data.augment import (
    apply_view,
    blur_kernel_size,
    center_view,
    crop_and_flip,
    make_view_batch,
    make_views,
    sample_view_params,
)


def _photo_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two real photos (astronaut, coffee) as uint8 canvases with full valid regions."""
    photos = [skdata.astronaut(), skdata.coffee()]
    batch = torch.stack(
        [
            TF.resize(torch.from_numpy(p).permute(2, 0, 1), [size, size], antialias=True)
            for p in photos
        ]
    )
    return batch, torch.tensor([[size, size]] * len(photos))


def test_parameters_stay_in_the_paper_ranges() -> None:
    # Crops cover 8-100% of the image within aspect 3/4-4/3 and stay inside it; factors obey s.
    config = AugmentConfig(image_size=32, jitter_strength=1.0, blur_prob=0.5)
    sizes = torch.tensor([[60, 40]] * 4000)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(0))
    x0, y0, w, h = params.crop_boxes.unbind(1)
    area = w * h / (60 * 40)
    found = (area >= 0.08 - 1e-6) & (area <= 1 + 1e-6)
    assert found.float().mean() > 0.95  # the rest used the centred fallback
    aspect = w / h
    assert ((aspect >= 3 / 4 - 1e-5) & (aspect <= 4 / 3 + 1e-5)).all()
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 40 + 1e-4).all() and (y0 + h <= 60 + 1e-4).all()
    for factor in (params.brightness, params.contrast, params.saturation):
        assert factor.min() >= 0.2 - 1e-6 and factor.max() <= 1.8 + 1e-6
    assert params.hue.abs().max() <= 0.2 + 1e-6
    assert params.blur_sigma.min() >= 0.1 and params.blur_sigma.max() <= 2.0
    for flag, prob in (
        (params.flip, 0.5),
        (params.jitter, 0.8),
        (params.grayscale, 0.2),
        (params.blur, 0.5),
    ):
        assert flag.float().mean().item() == pytest.approx(prob, abs=0.03)
    assert (params.jitter_order.sort(dim=1).values == torch.arange(4)).all()


def test_blur_is_off_by_default_at_64_px_and_on_above() -> None:
    # The paper skipped blur for CIFAR-10; the default follows the image size.
    sizes = torch.tensor([[64, 64]] * 500)
    small = sample_view_params(
        AugmentConfig(image_size=64), sizes, torch.Generator().manual_seed(0)
    )
    large = sample_view_params(
        AugmentConfig(image_size=96), sizes, torch.Generator().manual_seed(0)
    )
    assert not small.blur.any()
    assert large.blur.float().mean().item() == pytest.approx(0.5, abs=0.08)


def test_same_seed_gives_identical_views_and_other_seeds_differ() -> None:
    # A seed fixes every view; the two views, and each image, draw their own parameters.
    canvases, sizes = _photo_batch()
    config = AugmentConfig(image_size=32)
    first = make_views(canvases, sizes, config, torch.Generator().manual_seed(7))
    again = make_views(canvases, sizes, config, torch.Generator().manual_seed(7))
    other = make_views(canvases, sizes, config, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])
    assert not torch.allclose(first[0], first[1])
    assert first[0].shape == (2, 3, 32, 32)


def test_views_are_normalised_images_of_the_right_size_and_range() -> None:
    # Before normalisation a view lies in [0, 1]; after it, roughly zero-mean.
    canvases, sizes = _photo_batch(96)
    config = AugmentConfig(image_size=48, blur_prob=1.0)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(0))
    view = apply_view(canvases, params, config)
    assert view.shape == (2, 3, 48, 48)
    assert view.min() >= 0 and view.max() <= 1


def test_full_box_without_flip_is_the_identity_and_flip_mirrors() -> None:
    # Sampling the whole canvas at its own size returns it; the flip mirrors the width.
    canvases, _ = _photo_batch(32)
    images = canvases.float() / 255
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    same = crop_and_flip(images, boxes, torch.tensor([False, False]), size=32)
    mirrored = crop_and_flip(images, boxes, torch.tensor([True, True]), size=32)
    assert torch.allclose(same, images, atol=1e-5)
    assert torch.allclose(mirrored, images.flip(-1), atol=1e-5)


def test_crop_box_selects_the_region_it_names() -> None:
    # A box over the right half, sampled at its own size, equals that half of the canvas.
    canvases, _ = _photo_batch(32)
    images = canvases.float() / 255
    boxes = torch.tensor([[16.0, 0.0, 16.0, 16.0]] * 2)
    crop = crop_and_flip(images, boxes, torch.tensor([False, False]), size=16)
    assert torch.allclose(crop, images[:, :, :16, 16:], atol=1e-5)


def test_enlarged_crop_at_the_image_edge_never_mixes_in_the_padding() -> None:
    # A 2 px wide white image in a 192 px canvas, enlarged to 96 px: every output pixel is
    # white. Sampling past the box's last pixel centre used to blend in the zero padding
    # (the last ~25 columns faded to half grey).
    canvas = torch.zeros(1, 3, 192, 192)
    canvas[0, :, :, :2] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 2.0, 192.0]])
    for flip in (False, True):
        crop = crop_and_flip(canvas, boxes, torch.tensor([flip]), size=96)
        assert torch.allclose(crop, torch.ones_like(crop), atol=1e-6)


def test_enlarged_crop_equals_cutting_the_box_out_then_resizing() -> None:
    # An enlarged crop inside a photo repeats the box's own edge pixels, as torchvision's
    # crop followed by a bilinear resize does, rather than reading the pixels beyond it.
    canvases, _ = _photo_batch(64)
    images = canvases.float() / 255
    top, left, height, width = 10, 20, 12, 16
    boxes = torch.tensor([[float(left), float(top), float(width), float(height)]] * 2)
    ours = crop_and_flip(images, boxes, torch.tensor([False, True]), size=40)
    cut = images[:, :, top : top + height, left : left + width]
    theirs = torch.nn.functional.interpolate(
        cut, size=(40, 40), mode="bilinear", align_corners=False, antialias=False
    )
    assert torch.allclose(ours[0], theirs[0], atol=1e-5)
    assert torch.allclose(ours[1], theirs[1].flip(-1), atol=1e-5)


def test_center_view_of_a_wide_image_takes_its_middle_square() -> None:
    # Evaluation view: shorter side to size, centre square; padding is never sampled.
    canvas = torch.zeros(1, 3, 8, 8)
    canvas[0, :, :4, :] = 0.5  # valid region 4 x 8 (h x w), zero padding below
    canvas[0, :, :4, 2:6] = 1.0  # the centre 4 x 4 square is white
    out = center_view(canvas, torch.tensor([[4, 8]]), size=4)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize(
    ("name", "reference", "factor"),
    [
        ("_adjust_brightness", TF.adjust_brightness, 1.4),
        ("_adjust_contrast", TF.adjust_contrast, 0.6),
        ("_adjust_saturation", TF.adjust_saturation, 1.7),
        ("_adjust_hue", TF.adjust_hue, 0.15),
        ("_adjust_hue", TF.adjust_hue, -0.2),
    ],
)
def test_colour_adjustments_match_torchvision_per_image(name, reference, factor) -> None:
    # Each batched adjustment equals torchvision's single-image version on a real photo.
    canvases, _ = _photo_batch(32)
    images = canvases.float() / 255
    ours = getattr(augment, name)(images.clone(), torch.tensor([factor, factor]))
    theirs = torch.stack([reference(image, factor) for image in images])
    assert torch.allclose(ours, theirs, atol=2e-3)


def test_hue_matches_torchvision_over_the_whole_shift_range() -> None:
    # Shifts up to half the circle (jitter strength 2.5) take the hue past both ends of its
    # range, where it must wrap; grey pixels, primaries, ties between the two largest
    # channels and a real photo each turn as torchvision turns them.
    canvases, _ = _photo_batch(32)
    photo = canvases[:1].float() / 255
    levels = torch.linspace(0, 1, 5)
    grid = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 5, 25)  # every mix
    tiles = torch.cat([photo[..., :32, :32], torch.nn.functional.pad(grid, (0, 7, 0, 27))])
    shifts = torch.tensor([-0.5, -0.37, -0.2, -0.01, 0.0, 0.08, 0.26, 0.41, 0.5])
    for shift in shifts.tolist():
        ours = augment._adjust_hue(tiles.clone(), torch.full((2,), shift))
        theirs = torch.stack([TF.adjust_hue(image, shift) for image in tiles])
        assert torch.allclose(ours, theirs, atol=2e-3), shift


def test_hue_of_channels_a_subnormal_apart_is_finite() -> None:
    # Channels that differ by less than the smallest normal float once made the hue's
    # reciprocal infinite and the pixel NaN; torchvision leaves such a pixel as it is.
    images = torch.tensor([1e-40, 0.0, 0.0, 0.5, 0.5 + 1e-40, 0.5]).reshape(2, 3, 1, 1)
    shifts = (0.3, -0.3)
    ours = augment._adjust_hue(images.clone(), torch.tensor(shifts))
    theirs = torch.stack(
        [TF.adjust_hue(image, shift) for image, shift in zip(images, shifts, strict=True)]
    )
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_blur_kernel_is_about_a_tenth_of_the_side() -> None:
    # 23 px at 224 px, as the paper says; always odd.
    assert blur_kernel_size(224) == 23
    assert all(blur_kernel_size(size) % 2 == 1 for size in range(8, 300))


def test_blur_keeps_flat_images_flat_and_smooths_real_ones() -> None:
    # A Gaussian kernel sums to one (flat stays flat) and lowers a photo's pixel variance.
    canvases, _ = _photo_batch(64)
    images = canvases.float() / 255
    blurred = augment._gaussian_blur(images.clone(), torch.tensor([2.0, 2.0]))
    flat = augment._gaussian_blur(torch.full((1, 3, 16, 16), 0.3), torch.tensor([1.5]))
    assert torch.allclose(flat, torch.full_like(flat, 0.3), atol=1e-6)
    assert blurred.diff(dim=-1).abs().mean() < images.diff(dim=-1).abs().mean()


def test_grayscale_views_have_equal_channels() -> None:
    # Grayscale replaces the three channels by the same luma.
    canvases, sizes = _photo_batch()
    config = AugmentConfig(image_size=32, grayscale_prob=1.0, jitter_prob=0.0)
    view = apply_view(canvases, sample_view_params(config, sizes, torch.Generator()), config)
    assert torch.allclose(view[:, 0], view[:, 1]) and torch.allclose(view[:, 1], view[:, 2])


def test_tiny_and_elongated_images_get_valid_crops() -> None:
    # 1x1 and 1000x10 images (as valid regions) never yield empty or outside boxes.
    sizes = torch.tensor([[1, 1], [10, 1000], [1000, 10]])
    params = sample_view_params(AugmentConfig(image_size=32), sizes, torch.Generator())
    x0, y0, w, h = params.crop_boxes.unbind(1)
    assert (w > 0).all() and (h > 0).all()
    assert (x0 + w <= sizes[:, 1] + 1e-4).all() and (y0 + h <= sizes[:, 0] + 1e-4).all()
    assert not math.isnan(float(params.crop_boxes.sum()))


def _torchvision_view(image, params, i):
    """One view's colour steps for image i, with torchvision's single-image functions."""
    steps = (
        (TF.adjust_brightness, params.brightness),
        (TF.adjust_contrast, params.contrast),
        (TF.adjust_saturation, params.saturation),
        (TF.adjust_hue, params.hue),
    )
    if params.jitter[i]:
        for op_index in params.jitter_order[i].tolist():
            function, factors = steps[op_index]
            image = function(image, float(factors[i]))
    if params.grayscale[i]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image


def _shifted_crops(
    count: int, *, side: int, window: int, period: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of three real photos as uint8 canvases of side x side, with full valid regions.

    Crop i is window x window, shifted down by i % period, so the crops all differ.
    """
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    canvases = torch.stack(
        [
            TF.resize(
                torch.from_numpy(photos[i % 3]).permute(2, 0, 1)[
                    :, i % period : i % period + window, :window
                ],
                [side, side],
                antialias=True,
            )
            for i in range(count)
        ]
    )
    return canvases, torch.tensor([[side, side]] * count)


def test_grouped_batch_matches_torchvision_image_by_image() -> None:
    # The batch is reordered so images sharing a jitter order are adjusted together, then put
    # back: every image must still get its own four steps, in its own order, and its own
    # grayscale, and land in its own row. 80 crops of three photos cover all 24 orders.
    canvases, sizes = _shifted_crops(80, side=48, window=200, period=97)
    config = AugmentConfig(image_size=24, blur_prob=0.0, grayscale_prob=0.3)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(1))
    assert len({tuple(order) for order in params.jitter_order[params.jitter].tolist()}) == 24
    ours = apply_view(canvases, params, config)
    crops = crop_and_flip(canvases.float() / 255, params.crop_boxes, params.flip, size=24)
    theirs = torch.stack([_torchvision_view(crops[i], params, i) for i in range(80)])
    assert torch.allclose(ours, theirs, atol=3e-3)
    assert (ours - crops).abs().amax(dim=(1, 2, 3)).min() < 1e-6  # some rows left unchanged
    assert (ours - crops).abs().amax(dim=(1, 2, 3)).max() > 0.1


def test_blur_in_groups_matches_blurring_the_whole_batch() -> None:
    # Blur runs group by group on the reordered batch; it must equal one blur over all rows.
    canvases, sizes = _photo_batch(64)
    canvases, sizes = canvases.repeat(20, 1, 1, 1), sizes.repeat(20, 1)
    config = AugmentConfig(image_size=32, blur_prob=1.0, jitter_prob=0.5, grayscale_prob=0.0)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(5))
    blurred = apply_view(canvases, params, config)
    no_blur = replace(params, blur=torch.zeros_like(params.blur))
    expected = augment._gaussian_blur(apply_view(canvases, no_blur, config), params.blur_sigma)
    assert torch.allclose(blurred, expected, atol=1e-5)


# Sigmas whose Gaussian has a tap below float32's normal range unless it is dropped (a tap t
# px out is exp(-t^2 / (2 sigma^2)), subnormal for t^2 / (2 sigma^2) in 87.3-103.3).
_SUBNORMAL_SIGMAS = (0.145, 0.21, 0.29, 0.36)


@pytest.mark.parametrize("size", [24, 96])
def test_blur_matches_torchvision_per_image(size) -> None:
    # One batched blur with a sigma per image equals torchvision's blur of each image alone
    # (same kernel size, mirrored border), including sigmas whose smallest taps are dropped.
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    sigmas = (0.1, *_SUBNORMAL_SIGMAS, 1.0, 2.0)
    images = torch.stack(
        [
            TF.resize(torch.from_numpy(photos[i % 3]).permute(2, 0, 1), [size, size]).float() / 255
            for i in range(len(sigmas))
        ]
    )
    ours = augment._gaussian_blur(images, torch.tensor(sigmas))
    side = blur_kernel_size(size)
    for image, sigma, blurred in zip(images, sigmas, ours, strict=True):
        theirs = TF.gaussian_blur(image, [side, side], [sigma, sigma])
        assert torch.allclose(blurred, theirs, atol=1e-5), sigma


def test_blur_weights_are_never_subnormal() -> None:
    # Products with subnormal floats run 10-20x slower on x86; the blur drops such taps.
    sigma = torch.tensor(_SUBNORMAL_SIGMAS)
    matrices = augment._blur_matrices(sigma, 96, blur_kernel_size(96))
    nonzero = matrices[matrices != 0]
    assert nonzero.abs().min() >= torch.finfo(torch.float32).tiny
    assert torch.allclose(matrices.sum(dim=2), torch.ones(len(sigma), 96))


def test_every_mix_of_jitter_grayscale_and_blur_matches_torchvision_image_by_image() -> None:
    # Inside each jitter group the images are sorted by what follows (nothing, blur, both,
    # grayscale) so that each step is one slice: every image must still get exactly its own
    # steps and land in its own row.
    canvases, sizes = _shifted_crops(120, side=64, window=250, period=89)
    config = AugmentConfig(image_size=32, blur_prob=0.5, grayscale_prob=0.5)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(3))
    mixes = set(zip(params.grayscale.tolist(), params.blur.tolist(), strict=True))
    assert mixes == {(False, False), (False, True), (True, False), (True, True)}
    ours = apply_view(canvases, params, config)
    crops = crop_and_flip(canvases.float() / 255, params.crop_boxes, params.flip, size=32)
    side = blur_kernel_size(32)
    for i in range(120):
        theirs = _torchvision_view(crops[i], params, i)
        if params.blur[i]:
            sigma = float(params.blur_sigma[i])
            theirs = TF.gaussian_blur(theirs, [side, side], [sigma, sigma]).clamp(0, 1)
        assert torch.allclose(ours[i], theirs, atol=3e-3), i


def test_make_views_normalises_each_view_of_its_own_parameters() -> None:
    # make_views normalises group by group as it finishes them; the result must equal the
    # two views drawn from the same generator, made one at a time and normalised after.
    canvases, sizes = _photo_batch(64)
    canvases, sizes = canvases.repeat(24, 1, 1, 1), sizes.repeat(24, 1)
    config = AugmentConfig(image_size=32, blur_prob=0.5)
    view_a, view_b = make_views(canvases, sizes, config, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    params_a = sample_view_params(config, sizes, generator)
    params_b = sample_view_params(config, sizes, generator)
    expected_a = augment.normalize(apply_view(canvases, params_a, config), config)
    expected_b = augment.normalize(apply_view(canvases, params_b, config), config)
    assert torch.allclose(view_a, expected_a, atol=1e-5)
    assert torch.allclose(view_b, expected_b, atol=1e-5)
    assert not torch.allclose(view_a, view_b, atol=0.1)


def test_view_batch_is_both_views_stacked_channels_last() -> None:
    # The step's input: view a of every image, then view b, laid out channels-last.
    canvases, sizes = _photo_batch(64)
    canvases, sizes = canvases.repeat(5, 1, 1, 1), sizes.repeat(5, 1)
    config = AugmentConfig(image_size=32)
    stacked = make_view_batch(canvases, sizes, config, torch.Generator().manual_seed(4))
    view_a, view_b = make_views(canvases, sizes, config, torch.Generator().manual_seed(4))
    assert stacked.shape == (20, 3, 32, 32)
    assert stacked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(stacked[:10], view_a) and torch.equal(stacked[10:], view_b)


def test_groups_cut_into_pieces_finish_every_image_the_same() -> None:
    # Long jitter groups are cut so a piece stays in cache; each piece must keep its grayscale
    # and blurred images contiguous, so the views are those of the uncut groups.
    canvases, sizes = _photo_batch(64)
    canvases, sizes = canvases.repeat(60, 1, 1, 1), sizes.repeat(60, 1)
    config = AugmentConfig(image_size=32, blur_prob=0.5, grayscale_prob=0.5)
    params = sample_view_params(config, sizes, torch.Generator().manual_seed(9))
    whole, cut = augment._group_plan(params), augment._group_plan(params, max_group=3)
    assert max(cut.sizes) == 3 and max(whole.sizes) > 3 and sum(cut.sizes) == 120
    assert torch.equal(whole.order, cut.order)
    crops = augment._sorted_crops(canvases, [params], whole, size=32)
    expected = augment._finish_groups(crops.clone(), whole)
    assert torch.allclose(augment._finish_groups(crops, cut), expected, atol=1e-6)


def test_only_the_cpu_cuts_groups_into_pieces() -> None:
    # Pieces keep a group in a CPU core's cache; on a GPU they would only add kernel launches.
    assert augment._max_group(96, torch.device("cpu")) == 18  # 2 MiB of 96 px float images
    assert augment._max_group(1024, torch.device("cpu")) == 1
    assert augment._max_group(96, torch.device("cuda")) is None
    assert augment._max_group(96, torch.device("mps")) is None
