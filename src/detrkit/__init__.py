"""detrkit: the DETR family of end-to-end object detectors in one PyTorch package."""

from detrkit.api import create_model, list_models, load_checkpoint
from detrkit.inference.detector import Detections, Detector

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "create_model", "list_models", "load_checkpoint", "__version__"]
