import os

import pytest
import torch

# Without a GPU, Triton kernels (the fused deformable attention) run in Triton's interpreter on the CPU. Set before
# anything imports triton (detrkit's imports do, through torch): triton decides at import time whether its own
# library functions are compiled or interpreted. It only affects Triton, not torch.compile's CPU code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from detrkit.data import make_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A tiny synthetic COCO-format dataset: 12 train and 4 val images of ~128 px."""
    out = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(out, num_train=12, num_val=4, image_size=128, max_objects=6, progress=False)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Settings that make any preset tiny enough for CPU tests.
TINY = dict(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, num_queries=10)


# The fault-injection suite (tests/test_faults.py, `python -m pytest -m faults`) records what it tried here and
# prints the list at the end of the run (also saved in .pytest_cache/v/detrkit/faults).
FAULTS: list[dict] = []


@pytest.fixture
def record_fault(request):
    def record(fault: str, outcome: str) -> None:
        FAULTS.append({"test": request.node.name, "fault": fault, "outcome": outcome})

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FAULTS:
        return
    terminalreporter.section("fault injection: what was tried")
    width = max(len(f["fault"]) for f in FAULTS)
    for f in FAULTS:
        terminalreporter.write_line(f"{f['fault']:<{width}}  ->  {f['outcome']}")
    terminalreporter.write_line(f"{len(FAULTS)} faults injected")
    if config.cache is not None:
        config.cache.set("detrkit/faults", FAULTS)
