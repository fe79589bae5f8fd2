"""The WideResNet-50 extractor: grid sizes, weights handling, determinism."""

from __future__ import annotations

import logging

import pytest
import torch

from ocbank.model.features import FEATURE_DIM, FeatureExtractor, WeightsError, imagenet_weights_file


@pytest.mark.parametrize(("size", "grid"), [(224, 28), (512, 64), (64, 8)])
def test_feature_grid(extractor, size, grid):
    feats = extractor(torch.randn(1, 3, size, size))
    assert feats.shape == (1, grid, grid, FEATURE_DIM) and feats.dtype == torch.float32


def test_layer3_is_upsampled_and_concatenated(extractor):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        f2 = extractor.layer2(extractor.stem(x))
        f3 = extractor.layer3(f2)
    feats = extractor(x)
    torch.testing.assert_close(feats[..., :512], f2.permute(0, 2, 3, 1))
    up = torch.nn.functional.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(feats[..., 512:], up.permute(0, 2, 3, 1))


def test_random_weights_are_seeded_and_announced(extractor, caplog):
    with caplog.at_level(logging.WARNING):
        again = FeatureExtractor(weights="none")
    assert "randomly initialised" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), extractor(x))


def test_missing_imagenet_weights_fail_with_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, url = imagenet_weights_file()
    assert str(tmp_path) in str(path)
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(weights="imagenet")
    assert str(path) in str(info.value) and url in str(info.value) and "never falls back" in str(info.value)


def test_state_dict_path_loads_and_bad_files_fail(tmp_path, extractor):
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.wide_resnet50_2(weights=None)
    good = tmp_path / "wrn.pth"
    torch.save(net.state_dict(), good)
    loaded = FeatureExtractor(weights=str(good))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), extractor(x))
    assert loaded.describe()["weights_sha256"]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not load"):
        FeatureExtractor(weights=str(bad))
    with pytest.raises(WeightsError, match="does not exist"):
        FeatureExtractor(weights=str(tmp_path / "missing.pth"))


def test_pooling_option_and_validation(extractor):
    pooled = FeatureExtractor(weights="none", pool="avg3")
    x = torch.randn(1, 3, 64, 64)
    assert pooled(x).shape == extractor(x).shape
    assert not torch.allclose(pooled(x), extractor(x))
    with pytest.raises(ValueError, match="pool"):
        FeatureExtractor(weights="none", pool="max5")
