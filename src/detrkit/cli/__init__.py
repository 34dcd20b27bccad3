"""The ``detrkit`` command: parse the arguments, call the library, print. No library logic lives here.

Subcommands: demo, train, eval, recipes (:mod:`.train`); predict, explain, export (:mod:`.predict`); models, convert
(:mod:`.weights`); data synth | check | convert (:mod:`.data`).
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

from detrkit.cli import predict, train, weights
from detrkit.cli.common import CommandError
from detrkit.cli.data import add_data_commands, run_data_command
from detrkit.data.coco import DatasetError
from detrkit.engine.config import ConfigError
from detrkit.engine.train import TrainingError
from detrkit.registry import UnknownModelError
from detrkit.weights.files import CheckpointError

SUBCOMMANDS = {  # name: (parser, command, one-line help)
    "demo": (train.demo_parser, train.cmd_demo, "end-to-end demo on built-in synthetic data"),
    "train": (train.train_parser, train.cmd_train, "train on your own data (COCO, YOLO, VOC folders)"),
    "eval": (train.eval_parser, train.cmd_eval, "evaluate a checkpoint (COCO AP)"),
    "predict": (predict.predict_parser, predict.cmd_predict, "predict on images, folders, globs or a video"),
    "recipes": (train.recipes_parser, train.cmd_recipes, "list the training recipes and what each sets"),
    "models": (weights.models_parser, weights.cmd_models, "list presets"),
    "explain": (predict.explain_parser, predict.cmd_explain, "draw what each detection attended to"),
    "export": (predict.export_parser, predict.cmd_export, "export to ONNX (with an onnxruntime parity check)"),
    "convert": (weights.convert_parser, weights.cmd_convert, "convert official / detrex / HF checkpoints to detrkit"),
}
# What a command may raise that the user can fix: printed as one line, exit status 2.
# A folder where a file was expected (or the reverse), or a path the user may not write, is one too.
USER_ERRORS = (DatasetError, ConfigError, CheckpointError, UnknownModelError, FileNotFoundError, CommandError,
               TrainingError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def parser() -> ArgumentParser:
    root = ArgumentParser(prog="detrkit", description="DETR-family object detectors: train, evaluate, predict.")
    sub = root.add_subcommands(dest="command")
    for name, (build, _, help_) in SUBCOMMANDS.items():
        sub.add_subcommand(name, build(), help=help_)
    add_data_commands(sub)
    return root


def _underscored(option: str) -> str:
    name, eq, value = option[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --skip-invalid and --skip_invalid both work: options are spelled with underscores
    argv = [_underscored(a) if a.startswith("--") else a for a in argv]
    args = parser().parse_args(argv)
    command = args.command
    try:
        if command == "data":
            return run_data_command(args.data)
        SUBCOMMANDS[command][1](args[command])
    except USER_ERRORS as e:
        print(f"detrkit {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detrkit {command}: interrupted", file=sys.stderr)
        return 130
    return 0
