"""`umm generate` under bad settings (issue 20): non-finite --cfg and NaN outputs never become an image, and the
usual misuses get one clear line on stderr and exit code 2 (no traceback, no file, no temp file left).

One save_pretrained folder of the untrained tiny preset serves every test (generation: 2 steps at 32 px)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from umm_ops.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    CheersModel("tiny").save_pretrained(folder)
    return folder


def _gen(ckpt, tmp_path, *extra):
    return main(["generate", str(ckpt), "--prompt", "a red circle", "--steps", "2", "--size", "32", *extra])


def test_generate_writes_an_image(ckpt, tmp_path):
    png = tmp_path / "ok.png"
    assert _gen(ckpt, tmp_path, "--out", str(png)) == 0 and png.is_file()


@pytest.mark.parametrize("cfg", ["nan", "inf", "-inf"])
def test_non_finite_cfg_is_refused(ckpt, tmp_path, capsys, cfg):
    png = tmp_path / "x.png"
    assert _gen(ckpt, tmp_path, f"--cfg={cfg}", "--out", str(png)) == 2
    assert "--cfg must be a finite number" in capsys.readouterr().err
    assert not png.exists()
    model_cfg = ["generate_image", "cfg_scale must be a finite number"]
    from umm_ops.model.cheers import CheersModel

    with pytest.raises(ValueError, match=model_cfg[1]):
        CheersModel.from_pretrained(ckpt).generate_image(["x"], height=32, width=32, steps=1,
                                                         cfg_scale=float(cfg))


def test_nan_output_is_an_error_not_an_image(ckpt, tmp_path, capsys, monkeypatch):
    """A model whose velocity is NaN: generate_image raises FloatingPointError, the CLI exits 2, no file."""
    import umm_ops.model.generate as G

    real = G._velocity
    monkeypatch.setattr(G, "_velocity", lambda *a, **k: real(*a, **k) * float("nan"))
    png = tmp_path / "nan.png"
    assert _gen(ckpt, tmp_path, "--out", str(png)) == 2
    err = capsys.readouterr().err
    assert "hold NaN / Inf values" in err and "no image is returned" in err
    assert not png.exists() and os.listdir(tmp_path) == []


def test_cli_refusals_are_one_clear_line(ckpt, tmp_path, capsys):
    png = tmp_path / "a.png"
    cases = [
        (["--out", str(tmp_path)], "is a folder; expected a file path"),
        (["--image", str(png), "--out", str(png)], "--image is a picture to ask about and needs --text"),
        (["--size", "0", "--out", str(png)], "--size must be a positive number of pixels, got 0"),
        (["--size", "-32", "--out", str(png)], "--size must be a positive number of pixels, got -32"),
        (["--size", "40", "--out", str(png)], "--size must be a multiple of"),
        (["--steps", "0", "--out", str(png)], "--steps must be >= 1, got 0"),
        (["--text", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--text", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--device", "nonsense", "--out", str(png)], "is not a device name"),
        (["--text", "--image", str(tmp_path)], "is a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--out", str(png)], "no usable CUDA device"))
    for extra, want in cases:
        assert _gen(ckpt, tmp_path, *extra) == 2, extra
        err = capsys.readouterr().err
        assert want in err, (extra, err)
        assert "Traceback" not in err
    assert os.listdir(tmp_path) == []  # no image, no temp file


def test_prompt_beyond_the_position_limit_is_refused(ckpt, tmp_path, capsys):
    from umm_ops.model.cheers import CheersModel

    limit = CheersModel.from_pretrained(ckpt).llm.config.max_position_embeddings
    long = "red " * (limit + 10)
    assert main(["generate", str(ckpt), "--prompt", long, "--text"]) == 2
    assert f"beyond the model's position limit of {limit}" in capsys.readouterr().err
    png = tmp_path / "long.png"
    assert main(["generate", str(ckpt), "--prompt", long, "--steps", "1", "--size", "32", "--out", str(png)]) == 2
    assert "position limit" in capsys.readouterr().err and not png.exists()


def test_out_folder_in_a_subprocess_leaves_nothing(ckpt, tmp_path):
    """The real entry point: a folder as --out is refused before generating; the folder stays empty."""
    res = subprocess.run([sys.executable, "-m", "umm_ops", "generate", str(ckpt), "--prompt", "x", "--steps", "1",
                          "--size", "32", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "is a folder" in res.stderr and "Traceback" not in res.stderr
    assert os.listdir(tmp_path) == []
