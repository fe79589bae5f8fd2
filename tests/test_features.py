"""The WideResNet-50 extractor: grid sizes, weights handling, determinism."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch

from ocbank.errors import ConfigError
from ocbank.model.features import (
    FEATURE_DIM,
    FeatureExtractor,
    WeightsError,
    imagenet_weights_file,
    random_wide_resnet50_2,
)


@pytest.fixture(scope="module")
def full_net() -> torch.nn.Module:
    """The whole random WideResNet-50 (layer4 and fc included), built once."""
    return random_wide_resnet50_2()


@pytest.mark.parametrize(("size", "grid"), [(224, 28), pytest.param(512, 64, marks=pytest.mark.slow), (64, 8)])
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


def test_random_weights_are_seeded_and_announced_once(extractor, caplog, monkeypatch):
    from ocbank import errors

    monkeypatch.setattr(errors, "_SAID", set())
    with caplog.at_level(logging.WARNING):
        again = FeatureExtractor(weights="none")
        FeatureExtractor(weights="none")  # a run's second backbone (the demo's evaluation) says nothing
    assert caplog.text.count("randomly initialised") == 1
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), extractor(x))


def test_missing_imagenet_weights_fail_with_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, url = imagenet_weights_file()
    assert str(tmp_path) in str(path)
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(weights="imagenet")
    assert str(path) in str(info.value) and url in str(info.value) and "never falls back" in str(info.value)


@pytest.mark.slow
def test_state_dict_path_loads_and_bad_files_fail(tmp_path, extractor, full_net):
    good = tmp_path / "wrn.pth"
    torch.save(full_net.state_dict(), good)
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


@pytest.mark.slow
def test_pooling_option_and_validation(extractor):
    pooled = FeatureExtractor(weights="none", pool="avg3")
    x = torch.randn(1, 3, 64, 64)
    assert pooled(x).shape == extractor(x).shape
    assert not torch.allclose(pooled(x), extractor(x))
    with pytest.raises(ConfigError, match="pool"):
        FeatureExtractor(weights="none", pool="max5")


@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
def test_autocast_off_cuda_runs_fp32_and_says_so_once(autocast, extractor, caplog, monkeypatch):
    """One rule (config.autocast_for): autocast applies on CUDA only. A config that asks for it
    (the bundled Real-IAD ones) runs on the CPU in fp32, with one warning per run, not a refusal."""
    from ocbank import Detector, config, errors

    monkeypatch.setattr(errors, "_SAID", set())
    cfg = config.from_dict({"device": "cpu", "backbone": {"autocast": autocast}}, require_root=False)
    assert cfg.backbone.autocast == autocast  # the config keeps what was asked for
    with caplog.at_level(logging.WARNING):
        first = FeatureExtractor(weights="none", autocast=autocast, device="cpu")
        again = Detector(weights="none", device="cpu", autocast=autocast).extractor
    assert first.autocast == again.autocast == "none"
    assert caplog.text.count(f"backbone.autocast '{autocast}' applies on CUDA only") == 1
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(first(x), extractor(x), rtol=0, atol=0)  # exact fp32 features


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_random_weights_are_identical_across_threads_and_leave_the_global_rng_alone(full_net):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    FeatureExtractor(weights="none")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is not advanced
    serial = _state(full_net)  # the whole net, built serially: the extractors' parts must equal it

    results: list[dict[str, torch.Tensor] | None] = [None] * 8
    stop = threading.Event()
    start = threading.Barrier(len(results) + 1)

    def build(i: int) -> None:
        start.wait()
        results[i] = _state(FeatureExtractor(weights="none"))

    def noise() -> None:  # another part of the program drawing from the global RNG meanwhile
        start.wait()
        while not stop.is_set():
            torch.rand(64)
            time.sleep(0.001)  # draw often, but leave the builders the CPU

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(results))]
    drawer = threading.Thread(target=noise)
    for t in (*threads, drawer):
        t.start()
    for t in threads:
        t.join()
    stop.set()
    drawer.join()
    # The extractor keeps stem/layer2/layer3 of the net: compare those tensors with the serial build.
    for got in results:
        assert got is not None
        for key, value in got.items():
            prefix, _, rest = key.partition(".")
            ref_key = key
            if prefix == "stem":  # stem = conv1, bn1, relu, maxpool, layer1 -> indices 0, 1, 4
                idx, _, tail = rest.partition(".")
                ref_key = {"0": "conv1", "1": "bn1", "4": "layer1"}[idx] + "." + tail
            assert torch.equal(value, serial[ref_key]), key


@pytest.mark.slow
def test_random_init_follows_torchvision_statistics(full_net):
    net = full_net
    conv = net.layer3[0].conv2  # 3x3: fan_out = out_channels * 9
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert abs(conv.weight.mean().item()) < 0.02 * math.sqrt(2.0 / fan_out)
    bn = net.layer2[1].bn3
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and int(bn.num_batches_tracked) == 0
    bound = 1.0 / math.sqrt(net.fc.in_features)
    assert net.fc.weight.abs().max().item() <= bound and net.fc.bias.abs().max().item() <= bound
    assert net.fc.weight.abs().max().item() > 0.99 * bound  # uniform over the whole range
    assert not torch.equal(random_wide_resnet50_2(seed=1, upto="layer1").conv1.weight, net.conv1.weight)
