"""`lrc-ray export`: the pre-trained encoder-decoder as a MONAI BasicUNet that loads without lrc_ray."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from lrc_ray.cli import main
from lrc_ray.config import RunConfig
from lrc_ray.engine.checkpoint import save_checkpoint
from lrc_ray.models.networks import LrcNetwork

TINY = {"features": [4, 4, 8, 8, 16, 4], "global_dim": 8, "global_hidden": 16, "local_dim": 8}

# Runs in a fresh interpreter that imports torch, MONAI and yaml, never lrc_ray.
LOADER = textwrap.dedent("""
    import sys, torch, yaml
    from monai.networks.nets import BasicUNet

    out, inputs, result = sys.argv[1:]
    spec = yaml.safe_load(open(f"{out}/basic_unet.yaml"))
    network = BasicUNet(**spec["constructor"])
    network.load_state_dict(torch.load(f"{out}/basic_unet.pt", weights_only=True), strict=True)
    network.eval()
    with torch.no_grad():
        torch.save(network(torch.load(inputs, weights_only=True)), result)
    assert "lrc_ray" not in sys.modules, "the loader must not need lrc_ray"
""")


def _checkpoint(path, *, norm="instance", weights_network=None, config_edit=None):
    """A pre-training checkpoint whose every weight (and norm statistic) is random, so a swapped key shows."""
    # batch norm only with a method without MoCo (RunConfig refuses it otherwise)
    config = RunConfig().replace(network={**TINY, "norm": norm}, data={"size": 64},
                                 pretrain={"method": "lrc" if norm == "batch" else "global+lrc"})
    torch.manual_seed(0)
    model = LrcNetwork(weights_network or config.network)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if value.ndim == 1 else torch.randn_like(value) * 0.3)
    raw = config.to_dict()
    if config_edit:
        config_edit(raw)
    save_checkpoint(path, state_dict=model.state_dict(), config=raw, epoch=3, history=[])
    return model.eval()


def _export(capsys, checkpoint, out):
    code = main(["-q", "export", "--checkpoint", str(checkpoint), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_a_process_without_lrc_ray_gets_the_same_decoder_features(capsys, tmp_path, norm):
    model = _checkpoint(tmp_path / "checkpoint.pt", norm=norm)
    code, out, err = _export(capsys, tmp_path / "checkpoint.pt", tmp_path / "export")
    assert code == 0, err
    assert "basic_unet.pt" in out and "basic_unet.yaml" in out
    inputs = torch.rand(2, 1, 64, 48)
    torch.save(inputs, tmp_path / "inputs.pt")
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "export"), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "result.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    with torch.no_grad():
        expected = model.backbone(inputs).decoder
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result.shape == expected.shape == (2, TINY["features"][5], 64, 48)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_the_yaml_states_constructor_preprocessing_and_source(capsys, tmp_path):
    _checkpoint(tmp_path / "checkpoint.pt")
    assert _export(capsys, tmp_path / "checkpoint.pt", tmp_path / "export")[0] == 0
    spec = yaml.safe_load((tmp_path / "export" / "basic_unet.yaml").read_text())
    assert spec["constructor"] | {"act": None} == {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 4, "features": [4, 4, 8, 8, 16, 4], "act": None,
        "norm": ["instance", {"affine": True}], "bias": True, "dropout": 0.0, "upsample": "deconv"}
    assert spec["preprocessing"]["spacing_mm"] == 6.25 and spec["preprocessing"]["size"] == 64
    assert spec["preprocessing"]["window_hu"] == [-175.0, 250.0]
    assert spec["source"]["method"] == "global+lrc" and spec["source"]["epoch"] == 3


def _assert_refused(capsys, tmp_path, checkpoint, pattern):
    import re

    code, _, err = _export(capsys, checkpoint, tmp_path / "export")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lrc-ray: error: "), err
    assert str(checkpoint) in lines[0] and re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "export").exists(), "nothing is written"


def test_a_corrupt_checkpoint_is_refused(capsys, tmp_path):
    _checkpoint(tmp_path / "checkpoint.pt")
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    _assert_refused(capsys, tmp_path, tmp_path / "checkpoint.pt", r"not a readable lrc_ray checkpoint")


def test_a_file_that_is_no_checkpoint_is_refused(capsys, tmp_path):
    (tmp_path / "notes.pt").write_text(json.dumps({"hello": 1}))
    _assert_refused(capsys, tmp_path, tmp_path / "notes.pt", r"not a readable lrc_ray checkpoint")
    _assert_refused(capsys, tmp_path, tmp_path / "missing.pt", r"checkpoint not found")


def test_a_checkpoint_of_another_kind_or_version_is_refused(capsys, tmp_path):
    torch.save({"kind": "lrc_ray.pretrained.v0", "state_dict": {}}, tmp_path / "old.pt")
    _assert_refused(capsys, tmp_path, tmp_path / "old.pt", r"expected kind lrc_ray.pretrained.v1")
    _checkpoint(tmp_path / "newer.pt", config_edit=lambda raw: raw["network"].update(width_multiplier=2))
    _assert_refused(capsys, tmp_path, tmp_path / "newer.pt",
                    r"unknown key 'network.width_multiplier'.*another lrc_ray version\?")


def test_weights_of_another_architecture_are_refused(capsys, tmp_path):
    other = RunConfig().replace(network={**TINY, "features": [8, 8, 16, 16, 32, 8]}).network
    _checkpoint(tmp_path / "checkpoint.pt", weights_network=other)
    _assert_refused(capsys, tmp_path, tmp_path / "checkpoint.pt",
                    r"backbone does not match network.features=\(4, 4, 8, 8, 16, 4\).*shape mismatch")
