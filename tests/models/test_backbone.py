import pytest
import torch
from torch import nn

from conftest import standardised_photos
from simclr_cli.models.backbone import Backbone, folded_for_inference
from simclr_cli.models.export import state_fingerprint


@pytest.mark.parametrize(("arch", "small_stem"), [("resnet18", True), ("resnet50", False)])
def test_folded_batch_norm_computes_the_same_features(arch: str, small_stem: bool) -> None:
    # Running statistics far from (0, 1), as after training, so that folding is not trivial.
    torch.manual_seed(0)
    backbone = Backbone(arch, small_stem=small_stem)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    backbone.eval()
    before = state_fingerprint(backbone)
    images = standardised_photos(64)

    folded = folded_for_inference(backbone)
    with torch.inference_mode():
        want, got = backbone(images), folded(images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert state_fingerprint(backbone) == before  # the original keeps its own norms


def test_a_norm_without_running_statistics_is_left_in_place() -> None:
    backbone = Backbone("resnet18", small_stem=True)
    backbone.resnet.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
    folded = folded_for_inference(backbone)
    assert isinstance(folded.resnet.bn1, nn.BatchNorm2d)
    assert isinstance(folded.resnet.layer1[0].bn1, nn.Identity)
