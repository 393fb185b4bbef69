import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from fer_core.errors import CheckpointError
from fer_core.models import build_model, load_checkpoint, model_from_checkpoint, parameter_groups
from fer_core.transforms import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, eval_transform


@pytest.fixture
def offline(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", refuse)


def test_offline_pretrained_falls_back_to_random_with_a_warning(offline):
    model, source, warning = build_model(7, pretrained=True)
    assert source == "random"
    assert "ImageNet weights could not be downloaded" in warning and "--weights" in warning
    assert model.fc.out_features == 7


def test_local_weights_file_is_loaded_and_recorded(tmp_path, offline):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model, source, warning = build_model(5, weights_path=str(path), in_channels=3)
    assert source == f"file:{path}" and warning is None
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5


def test_a_grey_first_layer_from_imagenet_filters_sees_what_the_colour_one_saw(tmp_path, offline):
    """Summed, std-weighted filters on a grey-normalised face respond like the three-channel
    filters on the face repeated and ImageNet-normalised, up to one constant per filter (which
    BatchNorm absorbs): checked away from the zero-padded border."""
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    grey_model, _, _ = build_model(5, weights_path=str(path))
    assert grey_model.conv1.weight.shape == (64, 1, 7, 7)
    face = torch.rand(2, 1, 48, 48)
    repeated = (face.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        colour = reference.conv1(repeated)[..., 2:-2, 2:-2]
        grey = grey_model.conv1((face - GREY_MEAN) / GREY_STD)[..., 2:-2, 2:-2]
    offset = (colour - grey).flatten(2)
    assert (offset - offset.mean(-1, keepdim=True)).abs().max() < 1e-4
    assert colour.abs().mean() > 0.05  # a real response, not zeros agreeing


def test_a_checkpoint_from_before_the_colour_choice_predicts_as_it_was_evaluated():
    """Old runs trained a 3-channel first layer on grey faces repeated and ImageNet-normalised;
    restored, the model takes today's one-channel grey input and gives the same outputs."""
    torch.manual_seed(0)
    old, _, _ = build_model(4, stem="small", pretrained=False, in_channels=3)
    old.eval()
    ckpt = {"model_state": old.state_dict(), "class_names": list("abcd"),
            "config": {"stem": "small", "img_size": 48}}  # no colour, no store_size: 48 px grey
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    unit = faces.unsqueeze(1).float() / 255
    as_before = (unit.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    restored = model_from_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.allclose(restored(eval_transform(faces, 48)), old(as_before), atol=1e-4)


def test_a_checkpoint_whose_first_layer_contradicts_its_colour_is_refused():
    grey, _, _ = build_model(4, pretrained=False, in_channels=1)
    ckpt = {"model_state": grey.state_dict(), "class_names": list("abcd"),
            "config": {"stem": "imagenet", "img_size": 48, "colour": "rgb"}}
    with pytest.raises(CheckpointError, match="takes 1 channel"):
        model_from_checkpoint(ckpt)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a torchvision ResNet18"):
        build_model(7, weights_path=str(path))


def test_head_only_freezes_the_backbone_and_small_stem_drops_maxpool():
    model, _, _ = build_model(7, mode="head_only", stem="small", pretrained=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 7)


def test_finetune_gives_the_backbone_its_own_learning_rate():
    model, _, _ = build_model(7, mode="finetune", pretrained=False)
    groups = parameter_groups(model, lr=0.1, backbone_lr_scale=0.1)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(0.01)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model_state": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing class_names, config"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
