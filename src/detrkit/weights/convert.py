"""``detrkit convert`` as a library call: any supported checkpoint -> a detrkit ``.safetensors`` file, with a report
of what was mapped, deliberately ignored and re-initialised."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from detrkit.weights.files import save_weights
from detrkit.weights.formats import Conversion, load_pretrained, read_checkpoint
from detrkit.weights.hub import resolve_weights


@dataclass
class ConversionReport:
    """What converting one checkpoint did.

    Attributes:
        conversion: the checkpoint as read and renamed (file, layout, ignored keys).
        model: the preset with the checkpoint loaded.
        meta: the detrkit metadata written with it.
        output: where the detrkit checkpoint was written (None: not written).
    """

    conversion: Conversion
    model: nn.Module
    meta: dict
    output: Path | None = None

    def lines(self) -> list[str]:
        """The report as the ``detrkit convert`` command prints it."""
        conv, meta, fmt = self.conversion, self.meta, self.conversion.format
        own, reinit = self.model.state_dict(), meta["source"]["reinitialised"]
        lines = [f"read {conv.file}: {conv.num_source_keys} tensors, layout {fmt.name} ({fmt.source})",
                 f"mapped: {conv.num_source_keys - len(conv.ignored)} checkpoint tensors -> "
                 f"{len(own) - len(reinit)} of the {len(own)} tensors of {meta['model']}",
                 f"ignored: {len(conv.ignored)}"]
        for reason in sorted({r for _, r in conv.ignored}):
            keys = [k for k, r in conv.ignored if r == reason]
            lines.append(f"  {len(keys)} x {reason}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        heads = (f" (class heads re-initialised for {meta['num_classes']} classes: "
                 f"{', '.join(reinit[:4])}{' ...' if len(reinit) > 4 else ''})") if reinit else ""
        lines.append(f"missing: {len(reinit)}{heads}")
        names = ", ".join(n for n in meta["class_names"][:6] if n != "N/A")
        lines.append(f"classes: {meta['num_classes']} ({names}, ...)")
        return lines


def convert_checkpoint(name: str, source: str | Path, output: str | Path | None = None, *,
                       num_classes: int | None = None, **overrides) -> ConversionReport:
    """Load ``source`` (file, folder, URL or released-weights tag) as preset ``name``; write it to ``output``.

    ``num_classes`` different from the checkpoint's re-initialises the class heads (reported, not warned).
    ``output`` gets the ``.safetensors`` suffix if it has another.
    """
    conv = read_checkpoint(resolve_weights(name, source, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-initialised heads are in the report
        model, meta = load_pretrained(name, conv, num_classes=num_classes, **overrides)
    report = ConversionReport(conv, model, meta)
    if output is not None:
        out = Path(output)
        out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
        out.parent.mkdir(parents=True, exist_ok=True)
        report.output = save_weights(out, model, meta)
    return report
