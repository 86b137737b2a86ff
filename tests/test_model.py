from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import model as model_mod


def test_presets_and_any_timm_name() -> None:
    assert model_mod.resolve_arch("mobilenetv3_small") == ("tf_mobilenetv3_small_100", "mobilenetv3_small")
    assert model_mod.resolve_arch("efficientnet_lite0") == ("tf_efficientnet_lite0", "efficientnet_lite0")
    assert model_mod.resolve_arch("resnet18") == ("resnet18", None)
    with pytest.raises(model_mod.WeightsError, match="unknown model 'not_a_model'"):
        model_mod.resolve_arch("not_a_model")


def test_weights_from_file_and_env(imagenet_like_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, info = model_mod.create_model("mobilenetv3_small", 4, weights=imagenet_like_weights)
    assert info.weights_source == f"file:{imagenet_like_weights.name}"
    assert info.weights_sha256 == model_mod.sha256_file(imagenet_like_weights)
    assert model.get_classifier().out_features == 4
    # The backbone holds exactly the file's weights.
    state = torch.load(imagenet_like_weights, weights_only=True)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])

    monkeypatch.setenv(model_mod.WEIGHTS_DIR_ENV, str(imagenet_like_weights.parent))
    _, info_env = model_mod.create_model("mobilenetv3_small", 4)
    assert info_env.weights_sha256 == info.weights_sha256


def test_weights_errors(tmp_path: Path, imagenet_like_weights: Path) -> None:
    with pytest.raises(model_mod.WeightsError, match="weights file not found"):
        model_mod.create_model("mobilenetv3_small", 3, weights=tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(model_mod.WeightsError, match="not a readable PyTorch weights file"):
        model_mod.create_model("mobilenetv3_small", 3, weights=corrupt)
    with pytest.raises(model_mod.WeightsError, match="does not fit tf_efficientnet_lite0"):
        model_mod.create_model("efficientnet_lite0", 3, weights=imagenet_like_weights)


def test_no_weights_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # HF_HUB_OFFLINE=1 (conftest) makes the Hub unreachable, as it is on this machine.
    with pytest.raises(model_mod.WeightsError, match="--weights PATH.*--no-pretrained"):
        model_mod.create_model("mobilenetv3_small", 3)
    model, info = model_mod.create_model("mobilenetv3_small", 3, pretrained=False)
    assert info.weights_source == "none"


def test_preprocess_from_pretrained_cfg() -> None:
    model, _ = model_mod.create_model("mobilenetv3_small", 3, pretrained=False)
    pre = model_mod.preprocess_for(model)
    assert pre.size == [224, 224] and pre.crop_pct == 0.875 and pre.interpolation == "bilinear"
    assert pre.input.mean == [0.5, 0.5, 0.5] and pre.input.std == [0.5, 0.5, 0.5]
    assert model_mod.preprocess_for(model, size=96).size == [96, 96]


def test_contract_model_normalizes_inside() -> None:
    model, _ = model_mod.create_model("mobilenetv3_small", 3, pretrained=False)
    model.eval()
    pre = model_mod.preprocess_for(model, size=64)
    pre.input.mean, pre.input.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # one per channel
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    contract = model_mod.ContractModel(model, pre).eval()
    with torch.no_grad():
        got = contract(torch.from_numpy(pixels))
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(pre.input.mean).view(1, 3, 1, 1), torch.tensor(pre.input.std).view(1, 3, 1, 1)
        want = model((x - mean) / std)
    assert torch.allclose(got, want, atol=1e-5)


def test_drop_path_skips_blocks_only_in_training(imagenet_like_weights: Path) -> None:
    model, _ = model_mod.create_model("mobilenetv3_small", 3, weights=imagenet_like_weights,
                                      drop_rate=0.0, drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.allclose(first, model(x))  # a different set of blocks skipped each step
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # Without it, training mode answers the same twice (batch norm uses the batch's own statistics).
    plain, _ = model_mod.create_model("mobilenetv3_small", 3, weights=imagenet_like_weights, drop_rate=0.0)
    plain.train()
    assert torch.allclose(plain(x), plain(x))
