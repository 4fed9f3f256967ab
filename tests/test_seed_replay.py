"""UMM_TEST_SEED replays a run's random inputs: the `seed` fixture must not depend on the process (Python's str
hash does: PYTHONHASHSEED)."""
import os
import subprocess
import sys
from pathlib import Path


def test_print_seed(seed):
    if os.environ.get("UMM_PRINT_SEED"):
        print(f"SEED={seed}")


def test_seed_fixture_is_the_same_in_every_process():
    here = Path(__file__)
    seen = set()
    for hashseed in ("1", "2"):
        env = dict(os.environ, UMM_TEST_SEED="12345", UMM_PRINT_SEED="1", PYTHONHASHSEED=hashseed,
                   OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "pytest", f"{here}::test_print_seed", "-q", "-s",
                              "-p", "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=300,
                             cwd=here.parent.parent)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        seen.add(next(ln for ln in out.stdout.splitlines() if "SEED=" in ln).split("SEED=")[1].split()[0])
    assert len(seen) == 1, seen
