import pytest
import torch

from fer_core.transforms import (GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, BatchMixer, denormalise,
                                 eval_transform, train_transform)


@pytest.mark.parametrize("shape,channels", [((4, 48, 48), 1), ((4, 48, 48, 3), 3)])
def test_eval_transform_keeps_the_images_channels_and_normalises_them(shape, channels):
    images = torch.full(shape, 255, dtype=torch.uint8)
    x = eval_transform(images, 64)
    assert x.shape == (4, channels, 64, 64) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    back = denormalise(x)
    assert torch.allclose(back, torch.ones_like(back), atol=1e-5)
    mean, std = ((GREY_MEAN,), (GREY_STD,)) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    for c in range(channels):
        assert x[0, c, 0, 0].item() == pytest.approx((1 - mean[c]) / std[c], abs=1e-5)


def test_rgb_channels_stay_in_order_through_the_transforms():
    images = torch.zeros((2, 48, 48, 3), dtype=torch.uint8)
    images[..., 0] = 255  # pure red
    x = denormalise(eval_transform(images, 48))
    assert torch.allclose(x[:, 0], torch.ones(2, 48, 48), atol=1e-5) and x[:, 1:].abs().max() < 1e-5
    augmented = denormalise(train_transform(images, 48, torch.Generator().manual_seed(0)))
    red_share = augmented[:, 0].sum() / augmented.sum()
    assert augmented.shape == (2, 3, 48, 48) and red_share > 0.8  # jitter and erasing noise aside, still red


def test_images_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="grey .* or RGB"):
        eval_transform(torch.zeros((2, 48, 48, 4), dtype=torch.uint8), 48)


def test_train_transform_is_seeded_and_random():
    images = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8)
    a = train_transform(images, 48, torch.Generator().manual_seed(1))
    b = train_transform(images, 48, torch.Generator().manual_seed(1))
    c = train_transform(images, 48, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (8, 1, 48, 48)


def test_train_transform_keeps_a_face_recognisable():
    """Augmentation must perturb, not destroy: augmented images stay correlated with the source."""
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    pattern = ((yy < 24).to(torch.uint8) * 200 + 30).expand(16, 48, 48).clone()
    clean = eval_transform(pattern, 48)[:, 0]
    noisy = train_transform(pattern, 48, torch.Generator().manual_seed(0))[:, 0]
    corr = torch.nn.functional.cosine_similarity(
        (clean - clean.mean()).flatten(1), (noisy - noisy.mean()).flatten(1))
    assert corr.median() > 0.6
    assert not torch.allclose(clean, noisy)
    assert IMAGENET_MEAN[0] > 0


def test_tta_views_are_ten_same_size_shifted_and_mirrored_copies():
    from fer_core.transforms import tta_views
    faces = torch.randint(0, 256, (2, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = eval_transform(faces, 48)
    views = tta_views(x)
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[5], torch.flip(x, dims=[3]))
    # genuinely different views (compared whole: a view and its mirror have the same pixel sum)
    assert all(not torch.equal(views[i], views[j]) for i in range(10) for j in range(i + 1, 10))
    # a corner-shifted view is the image moved by the shift (3 px at 48 px)
    assert torch.equal(views[4][..., :-6, :-6], x[..., 3:-3, 3:-3])


def test_augmentation_runs_where_the_images_are():
    """The gpu preset keeps images on the GPU: every augmentation step must stay on the images'
    device (the meta device stands in for a GPU here, and mixing devices would raise)."""
    images = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8).to("meta")
    x = train_transform(images, 40, torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == (4, 1, 40, 40)


def mixing_batch(n: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each face a constant image of its own value, so every output pixel tells its sources."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 16, 16).contiguous()
    return images, torch.arange(n) % classes


def test_mixup_blends_each_face_with_its_neighbour_and_mixes_the_labels_alike():
    images, labels = mixing_batch()
    mixed, targets = BatchMixer(4, mixup_alpha=0.4, cutmix_alpha=0)(images, labels, torch.Generator().manual_seed(3))
    share = targets[0, labels[0]].item()  # the first face's own label's share
    assert 0 < share < 1
    expected = share * images + (1 - share) * images.roll(1, 0)
    torch.testing.assert_close(mixed, expected)
    own = torch.nn.functional.one_hot(labels, 4).float()
    torch.testing.assert_close(targets, share * own + (1 - share) * own.roll(1, 0))


def test_cutmix_pastes_one_patch_and_the_labels_follow_its_area():
    images, labels = mixing_batch()
    mixed, targets = BatchMixer(4, mixup_alpha=0, cutmix_alpha=1.0)(images, labels, torch.Generator().manual_seed(5))
    own = mixed == images
    pasted = mixed == images.roll(1, 0)
    assert bool((own | pasted).all())  # every pixel is the face's own or its neighbour's
    kept = own[0, 0].float().mean().item()
    assert 0 < kept < 1
    torch.testing.assert_close(targets[0, labels[0]], torch.tensor(kept))
    assert torch.equal(own, own[:1].expand_as(own))  # one box, the same place in every face
    torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_mixing_is_seeded_by_the_generator_and_leaves_torchs_global_generator_alone():
    images, labels = mixing_batch()
    mixer = BatchMixer(4, mixup_alpha=0.4, cutmix_alpha=1.0)
    global_state = torch.random.get_rng_state()
    runs = [mixer(images, labels, torch.Generator().manual_seed(seed))[1] for seed in (1, 1, 2, 3, 4)]
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], other) for other in runs[2:])


def test_a_mixer_without_mixup_or_cutmix_is_refused():
    with pytest.raises(ValueError, match="MixUp or CutMix"):
        BatchMixer(4, mixup_alpha=0, cutmix_alpha=0)
