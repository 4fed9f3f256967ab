"""The command line: `umm mmd-bench preview` writes a grid with every registered degradation at every level."""
import subprocess
import sys

import pytest

PIL = pytest.importorskip("PIL.Image")


def test_mmd_bench_preview(tmp_path):
    from umm_ops.data import DEGRADATIONS, LEVELS

    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "umm_ops", "mmd-bench", "preview", "--out", str(out), "--size", "40"],
                         capture_output=True, text=True, check=True)
    assert f"{len(DEGRADATIONS)} degradations" in res.stdout
    im = PIL.open(out)
    rows, cols = len(DEGRADATIONS), len(LEVELS) + 1
    assert im.size == (150 + cols * 44, 20 + rows * 44)


def test_mmd_bench_preview_bad_image(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    res = subprocess.run([sys.executable, "-m", "umm_ops", "mmd-bench", "preview", "--image", str(bad),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert res.returncode != 0 and "cannot read image" in res.stderr


def test_cli_refusals_name_what_was_expected(tmp_path, capsys):
    """Issue 20: misuses get one line on stderr and exit 2 (no traceback), and a folder given where a file is
    expected (or the reverse) is called that, not 'does not exist'."""
    import torch

    from umm_ops.cli import main

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    cases = [
        (["eval", "--model", "tiny", "--json", str(tmp_path), "--n", "1", "--tasks", "vqa"],
         "--json " + str(tmp_path) + " is a folder; expected a file path"),
        (["eval", "--model", "tiny", "--out", str(a_file), "--n", "1"], "is a file; expected a folder"),
        (["eval", "--model", "tiny", "--device", "what", "--n", "1"], "is not a device name"),
        (["train", "--config", str(tmp_path)], "the file is a folder, not a file"),
        (["export", str(a_file), "--out", str(tmp_path / "x")], "is a file, not a folder"),
        (["build-tokenizer", "--vocab-size", "0", "--out", str(tmp_path / "tk")], "vocab_size must be an int > 263"),
        (["mmd-bench", "preview", "--out", str(tmp_path)], "is a folder; expected a file path"),
        (["mmd-bench", "preview", "--size", "0", "--out", str(tmp_path / "p.png")], "--size must be a positive"),
        (["mmd-bench", "preview", "--image", str(tmp_path), "--out", str(tmp_path / "p.png")],
         "is a folder, not a file"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "--model", "tiny", "--device", "cuda", "--n", "1"], "no usable CUDA device"))
    for argv, want in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
