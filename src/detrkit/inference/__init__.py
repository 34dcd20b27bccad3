"""Inference without the trainer: the Detector, predicting files and videos, explaining detections, drawing.

Imports the weights layer (to load any checkpoint) and data / models below it; never the engine.
"""

from detrkit.inference.detector import Detections, Detector, load_for_inference
from detrkit.inference.draw import draw_detections
from detrkit.inference.explain import Explanation, draw_explanation, explain
from detrkit.inference.predict import image_files, image_ids, predict_files, predict_video

__all__ = ["Detections", "Detector", "Explanation", "draw_detections", "draw_explanation", "explain", "image_files",
           "image_ids", "load_for_inference", "predict_files", "predict_video"]
