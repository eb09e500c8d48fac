"""Other projects' checkpoints onto our encoder: official SimCLR v1/v2 layouts and generic dicts.

The layouts below are written from the converters' architecture descriptions (tonylins/
simclr-converter for v1, Separius/SimCLRv2-Pytorch for v2): names and shapes only, filled
with random values. Wide nets are built on the meta device, so no test allocates them.
"""

import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from simclr_cli.errors import CheckpointError
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.export import load_model
from simclr_cli.models.foreign import convert_state

STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bn(shapes: dict[str, tuple[int, ...]], name: str, channels: int) -> None:
    for param in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{param}"] = (channels,)
    shapes[f"{name}.num_batches_tracked"] = ()


def v1_layout(width: int) -> dict[str, tuple[int, ...]]:
    """tonylins' resnet50x{width}: torchvision names, every channel count times `width`."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64 * width, 3, 7, 7)}
    _bn(shapes, "bn1", 64 * width)
    inplanes = 64 * width
    for stage, blocks in enumerate(STAGES[50], start=1):
        planes = 64 * width * 2 ** (stage - 1)
        for index in range(blocks):
            p = f"layer{stage}.{index}."
            shapes[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            _bn(shapes, p + "bn1", planes)
            shapes[p + "conv2.weight"] = (planes, planes, 3, 3)
            _bn(shapes, p + "bn2", planes)
            shapes[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            _bn(shapes, p + "bn3", 4 * planes)
            if index == 0:
                shapes[p + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                _bn(shapes, p + "downsample.1", 4 * planes)
            inplanes = 4 * planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048 * width), (1000,)
    return shapes


def v2_layout(
    depth: int, width: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Separius' r{depth}_{width}x_sk0: (resnet, contrastive head) names and shapes."""
    shapes: dict[str, tuple[int, ...]] = {"net.0.0.weight": (64 * width, 3, 7, 7)}
    _bn(shapes, "net.0.1.0", 64 * width)
    inplanes = 64 * width
    for stage, blocks in enumerate(STAGES[depth], start=1):
        planes = 64 * width * 2 ** (stage - 1)
        for index in range(blocks):
            p = f"net.{stage}.blocks.{index}."
            if index == 0:
                shapes[p + "projection.shortcut.weight"] = (4 * planes, inplanes, 1, 1)
                _bn(shapes, p + "projection.bn.0", 4 * planes)
            shapes[p + "net.0.weight"] = (planes, inplanes, 1, 1)
            _bn(shapes, p + "net.1.0", planes)
            shapes[p + "net.2.weight"] = (planes, planes, 3, 3)
            _bn(shapes, p + "net.3.0", planes)
            shapes[p + "net.4.weight"] = (4 * planes, planes, 1, 1)
            _bn(shapes, p + "net.5.0", 4 * planes)
            inplanes = 4 * planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
    head: dict[str, tuple[int, ...]] = {}
    for index, out in ((0, inplanes), (3, inplanes), (6, 128)):
        head[f"layers.{index}.weight"] = (out, inplanes)
        _bn(head, f"layers.{index + 1}", out)
    return shapes, head


def fill(
    shapes: dict[str, tuple[int, ...]], *, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random values with sane statistics (He-scaled weights, positive variances)."""
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) > 1:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / fan_in)
        elif key.endswith("weight"):  # BN scale near 1, so the signal survives 50 layers
            out[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=generator)
    return out


def meta_backbone_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        state = Backbone(arch, small_stem=False).state_dict()
    return {f"backbone.{k}": tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("width", [1, 2, 4])
def test_official_v1_layout_maps_key_for_key(width: int) -> None:
    # resnet50-{1,2,4}x.pth: every encoder tensor lands on ours, shapes equal; fc is dropped.
    raw = {"state_dict": fill(v1_layout(width), device="meta")}
    converted = convert_state(raw, source=f"resnet50-{width}x.pth")
    arch = "resnet50" if width == 1 else f"resnet50x{width}"
    shapes = {k: tuple(v.shape) for k, v in converted.state_dict.items()}
    assert shapes == meta_backbone_shapes(arch)
    assert converted.config["arch"] == arch and converted.config["feature_dim"] == 2048 * width
    pre = converted.config["preprocessing"]
    assert pre["mean"] == [0.0, 0.0, 0.0] and pre["std"] == [1.0, 1.0, 1.0]
    assert converted.config["training"]["source_format"] == "simclr-v1"


@pytest.mark.parametrize(("depth", "width"), [(50, 1), (50, 2), (101, 2), (152, 3)])
def test_official_v2_sk0_layouts_map_key_for_key(depth: int, width: int) -> None:
    # r{depth}_{width}x_sk0.pth: renamed to torchvision names; the head becomes ours (3 layers).
    resnet, head = v2_layout(depth, width)
    raw = {"resnet": fill(resnet, device="meta"), "head": fill(head, device="meta")}
    converted = convert_state(raw, source=f"r{depth}_{width}x_sk0.pth")
    arch = f"resnet{depth}" + ("" if width == 1 else f"x{width}")
    encoder = {
        k: tuple(v.shape) for k, v in converted.state_dict.items() if k.startswith("backbone.")
    }
    assert encoder == meta_backbone_shapes(arch)
    assert converted.config["projection"] == {"dim": 128, "layers": 3, "hidden_dim": 2048 * width}
    assert converted.config["preprocessing"]["std"] == [1.0, 1.0, 1.0]


class SeparusStyleResNet50(nn.Module):
    """An independent forward pass over v2's own names, to check the renaming is semantic."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state = state

    def _bn(self, x: torch.Tensor, name: str) -> torch.Tensor:
        s = self.state
        mean, var = s[f"{name}.running_mean"], s[f"{name}.running_var"]
        scale, shift = s[f"{name}.weight"], s[f"{name}.bias"]
        return F.batch_norm(x, mean, var, scale, shift, training=False, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state
        x = F.relu(self._bn(F.conv2d(x, s["net.0.0.weight"], stride=2, padding=3), "net.0.1.0"))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage, blocks in enumerate(STAGES[50], start=1):
            for index in range(blocks):
                p = f"net.{stage}.blocks.{index}."
                stride = 2 if stage > 1 and index == 0 else 1
                shortcut = x
                if index == 0:
                    shortcut = F.conv2d(x, s[p + "projection.shortcut.weight"], stride=stride)
                    shortcut = self._bn(shortcut, p + "projection.bn.0")
                y = F.relu(self._bn(F.conv2d(x, s[p + "net.0.weight"]), p + "net.1.0"))
                y = F.conv2d(y, s[p + "net.2.weight"], stride=stride, padding=1)
                y = F.relu(self._bn(y, p + "net.3.0"))
                y = self._bn(F.conv2d(y, s[p + "net.4.weight"]), p + "net.5.0")
                x = F.relu(shortcut + y)
        return x.mean(dim=(2, 3))


def _close_at_scale(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float32 rounding of the largest value.

    Random weights make outputs in the thousands whose small elements are differences of
    large terms; a per-element tolerance then fails on rounding alone (a 0.003 difference
    next to values of 4,500 was seen on an AVX2 CPU, where matrix kernels round differently).
    """
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max())


def test_v2_weights_compute_what_the_original_network_computes(tmp_path: Path) -> None:
    # Same input, same features (and same head output) as the v2 network under its own names.
    resnet, head = v2_layout(50, 1)
    raw = {"resnet": fill(resnet, seed=1), "head": fill(head, seed=2)}
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save(raw, path)
    model = load_model(path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.backbone(images)
        reference = SeparusStyleResNet50(raw["resnet"])(images)
        assert _close_at_scale(ours, reference)
        assert model.projection_head is not None
        projected = model.projection_head(ours)
        h = raw["head"]
        z = reference
        for index in (0, 3, 6):
            z = F.linear(z, h[f"layers.{index}.weight"])
            n = f"layers.{index + 1}"
            z = F.batch_norm(z, h[f"{n}.running_mean"], h[f"{n}.running_var"], h[f"{n}.weight"],
                             h[f"{n}.bias"], training=False, eps=1e-5)  # fmt: skip
            z = F.relu(z) if index < 6 else z
    assert _close_at_scale(projected, z)


def test_selective_kernel_v2_is_refused_by_name() -> None:
    # sk1 nets have no torchvision equivalent: a clear refusal, not a half-loaded model.
    resnet, head = v2_layout(50, 1)
    resnet["net.1.blocks.0.net.2.main_conv.0.weight"] = (128, 64, 3, 3)
    raw = {"resnet": fill(resnet, device="meta"), "head": fill(head, device="meta")}
    with pytest.raises(CheckpointError, match="selective-kernel"):
        convert_state(raw, source="r50_1x_sk1.pth")


@pytest.mark.parametrize("prefix", ["module.encoder.", "_orig_mod.module.backbone."])
def test_generic_state_dicts_with_usual_prefixes_load(
    prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # DDP, torch.compile and SSL-code prefixes are found; extra head keys are listed, not loaded.
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    state = {prefix + k: v for k, v in resnet.state_dict().items()}
    state[prefix.replace("backbone.", "").replace("encoder.", "") + "projector.0.weight"] = (
        torch.ones(4, 512)
    )
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    with caplog.at_level(logging.INFO, logger="simclr_cli"):
        model = load_model(path)
    assert model.config["arch"] == "resnet18"
    assert model.config["preprocessing"]["std"] == [0.229, 0.224, 0.225]  # ImageNet assumed
    assert "projector.0.weight" in caplog.text and "ignored" in caplog.text
    images = torch.rand(2, 3, 64, 64)
    resnet.fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.backbone(images), resnet(images), atol=1e-5)


def test_sequential_backbone_layout_loads(tmp_path: Path) -> None:
    # nn.Sequential(*resnet.children()[:-1]) saved under `backbone.` maps by child index.
    torch.manual_seed(0)
    resnet = torchvision.models.resnet34().eval()
    sequential = nn.Sequential(*list(resnet.children())[:-1])
    state = {f"backbone.{k}": v for k, v in sequential.state_dict().items()}
    torch.save(state, tmp_path / "lightly_style.pth")
    model = load_model(tmp_path / "lightly_style.pth")
    assert model.config["arch"] == "resnet34"
    resnet.fc = nn.Identity()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.backbone(images), resnet(images), atol=1e-5)


def test_missing_encoder_keys_are_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A partial checkpoint loads what it has and names what was left at random.
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith("layer4.1.bn2.")}  # fmt: skip
    torch.save(state, tmp_path / "partial.pt")
    load_model(tmp_path / "partial.pt")
    assert "missing" in caplog.text and "layer4.1.bn2.weight" in caplog.text


def test_a_checkpoint_with_no_matching_key_fails_loudly(tmp_path: Path) -> None:
    # Nothing that looks like a ResNet: an error, never a silently random encoder.
    torch.save({"transformer.blocks.0.weight": torch.ones(3)}, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="no ResNet encoder weights found"):
        load_model(tmp_path / "vit.pt")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    # weights_only loading refuses objects; the payload never runs.
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": torch.ones(1)}, "x": _RunsCode(marker)},
               tmp_path / "evil.pth")  # fmt: skip
    with pytest.raises(CheckpointError, match="would run code"):
        load_model(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_text_file_given_as_weights_is_not_called_code(tmp_path: Path) -> None:
    # torch words every weights_only failure alike; only a pickled global is code.
    (tmp_path / "notes.pt").write_text("x\n")
    with pytest.raises(
        CheckpointError, match="cannot be read safely as a torch checkpoint"
    ) as caught:
        load_model(tmp_path / "notes.pt")
    assert "run code" not in str(caught.value) and "weights_only" not in str(caught.value)


def test_official_v1_checkpoint_embeds_with_unit_range_inputs(
    tmp_path: Path, hub_cache: Any
) -> None:
    # lightly-ai/simclrv1-imagenet1k-resnet50-1x, cached as the Hub lays it out (random values
    # in its file's layout), embeds real photos fed in [0, 1] without mean/std normalisation.
    import numpy as np
    from PIL import Image
    from skimage import data as photos
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    state = fill(v1_layout(1), seed=4)
    torch.save({"state_dict": state}, tmp_path / "resnet50-1x.pth")
    repo = "lightly-ai/simclrv1-imagenet1k-resnet50-1x"
    files = {
        "resnet50-1x.pth": (tmp_path / "resnet50-1x.pth").read_bytes(),
        "README.md": b"---\nlicense: apache-2.0\n---\n",
        ".gitattributes": b"*.pth filter=lfs diff=lfs merge=lfs -text\n",
    }
    hub_cache.add(repo, files)
    folder = tmp_path / "photos"
    folder.mkdir()
    pictures = {"astronaut": photos.astronaut(), "coffee": photos.coffee(), "cat": photos.chelsea()}
    inputs = []
    for name, pixels in pictures.items():
        # 448 px is the decode canvas, so decoding leaves it alone; the 224 px centre view of it
        # is then exactly a 2x2 average (bilinear sampling halfway between pixels).
        square = Image.fromarray(pixels).resize((448, 448))
        square.save(folder / f"{name}.png")
        tensor = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).float() / 255
        inputs.append(F.avg_pool2d(tensor[None], 2)[0])  # (3, 224, 224) in [0, 1]
    out = tmp_path / "v.npy"
    result = CliRunner().invoke(app, ["embed", str(folder), "-m", repo, "-o", str(out),
                                      "--workers", "0", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    reference = torchvision.models.resnet50()
    reference.load_state_dict(state)
    reference.fc = nn.Identity()
    with torch.no_grad():
        expected = reference.eval()(torch.stack(inputs))  # order: astronaut, cat, coffee below
        normalised = reference((torch.stack(inputs) - 0.45) / 0.226)
    rows = torch.from_numpy(np.load(out))
    order = [0, 2, 1]  # the manifest is sorted by file name: astronaut, cat, coffee
    assert not torch.allclose(rows[0], rows[1], rtol=1e-2)  # the features see the image
    assert torch.allclose(rows, expected[order], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(rows, normalised[order], rtol=1e-2, atol=1e-2)
