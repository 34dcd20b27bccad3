"""Run by tests/test_faults.py: ``detrkit train`` killed (SIGKILL) in the middle of its Nth checkpoint write.

The Nth ``torch.save`` (each checkpoint's state.pt, written after its model.safetensors) writes half of its
file and then the process kills itself, as a power cut or the OOM killer would.
"""

import os
import signal
import sys

import torch

from detrkit.cli import main

KILL_ON = int(os.environ["FAULT_KILL_ON_SAVE"])
_real_save, _calls = torch.save, [0]


def _dying_save(obj, f, *args, **kwargs):
    _calls[0] += 1
    _real_save(obj, f, *args, **kwargs)
    if _calls[0] == KILL_ON:
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


torch.save = _dying_save
sys.exit(main(sys.argv[1:]))
