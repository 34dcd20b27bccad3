"""The package's import graph: inference must not pull in training."""

import subprocess
import sys


def test_import_detrkit_and_detector_do_not_import_the_trainer():
    code = ("import sys, detrkit, detrkit.detector; before = 'detrkit.engine.train' in sys.modules; "
            "import detrkit.engine.train; print(before, 'detrkit.engine.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]  # absent after importing the inference side; the probe sees it
