"""What several commands share: the error type printed without a traceback, and where a model comes from."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from detrkit.inference.detector import Detector


class CommandError(Exception):
    """A command that cannot do what it was asked (printed without a traceback, exit status 2)."""


def add_model_source(parser: ArgumentParser) -> None:
    """The model of predict / explain / export: a detrkit --checkpoint, or --model with any --weights."""
    parser.add_argument("--checkpoint", help="detrkit checkpoint folder, model.safetensors or training run folder")
    parser.add_argument("--model", help="preset of --weights, e.g. dino_r50_4scale")
    parser.add_argument("--weights", help="with --model: an official / detrex / HF checkpoint file, a URL, or 'coco' "
                                          "for the preset's released COCO weights")


def model_source(args: Namespace) -> tuple[str, str | None]:
    """(checkpoint, preset) of ``add_model_source``'s options: the preset is None for a detrkit checkpoint."""
    if args.checkpoint:
        return args.checkpoint, None
    if args.model and args.weights:
        return args.weights, args.model
    raise FileNotFoundError("give --checkpoint (a detrkit checkpoint) or --model with --weights")


def detector(args: Namespace) -> Detector:
    checkpoint, model = model_source(args)
    return Detector(checkpoint, model=model, device=args.device, threshold=args.threshold,
                    amp=getattr(args, "amp", "auto"), compile=getattr(args, "compile", False))
