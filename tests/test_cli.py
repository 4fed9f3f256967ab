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
