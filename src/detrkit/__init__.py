"""detrkit: the DETR family of end-to-end object detectors in one PyTorch package."""

from detrkit.detector import Detections, Detector
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "create_model", "list_models", "load_checkpoint", "__version__"]
