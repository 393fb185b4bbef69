import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from fer_core.errors import CheckpointError
from fer_core.models import build_model, load_checkpoint, parameter_groups


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
    model, source, warning = build_model(5, weights_path=str(path))
    assert source == f"file:{path}" and warning is None
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5


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
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 7)


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
