"""The package's import graph: layers import only downward, inference never pulls in training.

The layers, bottom to top (DESIGN.md): ops / runtime -> layers, backbones, registry -> models -> losses, data ->
weights -> engine, inference -> export -> api -> cli. A module may import its own package and any layer below
its own; nothing imports sideways into a sibling layer or up, and no detrkit import hides inside a function.
"""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"ops": 0, "runtime": 0, "layers": 1, "backbones": 1, "registry": 1, "models": 2, "losses": 3, "data": 3,
          "weights": 4, "engine": 5, "inference": 5, "export": 6, "api": 7, "cli": 8, "": 9}
# Modules that need an optional dependency at import: imported where they are used, inside the function.
OPTIONAL = {"detrkit.ops.ms_deform_attn_triton": "triton"}


def _module(file: Path) -> str:
    parts = list(file.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _detrkit_imports(file: Path) -> list[tuple[str, bool]]:
    """(imported detrkit module, whether the import is inside a function) for every import in ``file``."""
    tree, module = ast.parse(file.read_text()), _module(file)
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in inner) for n in names if n == "detrkit" or n.startswith("detrkit.")]
    return found


def _layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if module.count(".") else ""
    top = top if top in LAYERS else ""
    return top, LAYERS[top]


def test_every_import_points_down_the_layers():
    files = sorted((SRC / "detrkit").rglob("*.py"))
    assert len(files) > 40
    wrong = []
    for file in files:
        module = _module(file)
        own, rank = _layer(module)
        for target, inside_function in _detrkit_imports(file):
            if inside_function and target not in OPTIONAL:
                wrong.append(f"{module}: imports {target} inside a function")
            top, target_rank = _layer(target)
            if target == "detrkit" or (top != own and target_rank >= rank):
                wrong.append(f"{module} ({own or 'detrkit'}, layer {rank}) imports {target} (layer {target_rank})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # negative control: the graph walker sees an import of the engine from a model, and one inside a function
    probe = SRC / "detrkit" / "models" / "_probe_upward.py"
    probe.write_text("from detrkit.engine.train import Trainer\n\ndef f():\n    import detrkit.api\n")
    try:
        found = _detrkit_imports(probe)
    finally:
        probe.unlink()
    assert found == [("detrkit.engine.train", False), ("detrkit.api", True)]
    assert _layer("detrkit.models._probe_upward")[1] < _layer("detrkit.engine.train")[1]


def test_import_detrkit_and_detector_do_not_import_the_trainer():
    code = ("import sys, detrkit, detrkit.inference.detector; before = 'detrkit.engine.train' in sys.modules; "
            "import detrkit.engine.train; print(before, 'detrkit.engine.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]  # absent after importing the inference side; the probe sees it
