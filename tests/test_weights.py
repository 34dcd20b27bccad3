"""``create_model(name, weights=...)``: layout detection, strict loading, fine-tuning, label spaces, safe reading,
and the released-weights table (download, sha256, conversion, cache) against local ``file://`` URLs."""

import argparse
import hashlib
import re

import pytest
import torch
from test_detrex_names import _official_detr_keys, _to_detrex, official_detr_state
from test_official_names import _official_keys
from test_official_names_dino import (
    DEC,
    ENC,
    FFN,
    HEADS,
    POINTS,
    D,
    K,
    Q,
    _dab_official_keys,
    _detrex_dino_keys,
    _dino_official_keys,
)

from detrkit import create_model
from detrkit.cli import main
from detrkit.models import build_detr
from detrkit.registry import Weights, model_info
from detrkit.weights.files import CheckpointError
from detrkit.weights.formats import CLASS_DEPENDENT, detect_format, load_pretrained, read_state_dict
from detrkit.weights.hub import download

TINY = dict(backbone="resnet18", d_model=D, nhead=HEADS, num_encoder_layers=ENC, num_decoder_layers=DEC,
            dim_feedforward=FFN, num_queries=Q)
TINY_DINO = dict(TINY, n_points=POINTS, denoising={"num_dn_pairs": 100})
DETREX_DINO = dict(share_heads=False, pe_temperature=10000.0, pe_offset=-0.5)


def _random(keys: dict, seed: int = 0, shared_heads: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(shape, generator=g) for k, shape in keys.items()}
    # a valid BatchNorm, and weights scaled by fan-in so that a forward pass stays finite
    out = {k: v.abs() + 0.5 if "running_var" in k else v / v[0].numel() ** 0.5 if v.dim() > 1 else v
           for k, v in out.items()}
    return _tie_heads(out, shared_heads)


def _tie_heads(state: dict, shared_heads: bool) -> dict:
    """The values a real file holds for modules the reference code keeps under several names: the decoder's
    reference to a head (``transformer.decoder.bbox_embed.{i}``) is the head ``bbox_embed.{i}``; ``shared_heads``:
    one class head and one box head for every decoder layer (the official DINO, plain Deformable DETR)."""
    out = dict(state)
    for k in state:
        if m := re.match(r"^(?:transformer\.decoder\.)?((?:class|bbox)_embed)\.(\d+)\.(.*)$", k):
            source = f"{m.group(1)}.{0 if shared_heads else m.group(2)}.{m.group(3)}"
            if source in state and source != k:
                out[k] = state[source].clone()
    return out


def _with_classes(state: dict, num: int, shared_heads: bool = False) -> dict:
    """The same checkpoint with class heads of ``num`` outputs (label embeddings: ``num`` + 1 rows)."""
    out = {}
    for k, v in state.items():
        if CLASS_DEPENDENT.search(k) and v.shape[0] in (K, K + 1):
            v = torch.randn(num + v.shape[0] - K, *v.shape[1:])
        out[k] = v
    return _tie_heads(out, shared_heads)


LAYOUTS = {
    "official_detr": lambda: _official_detr_keys(),
    "official_deformable_detr": lambda: _official_keys(refine=True, two_stage=True),
    "official_dab_detr": lambda: _dab_official_keys(dn=True),
    "official_dino": _dino_official_keys,
    "detrex_detr": lambda: {_to_detrex(k, "detr"): v for k, v in _official_detr_keys().items()},
    "detrex_deformable_detr": lambda: {_to_detrex(k, "deformable"): v for k, v in _official_keys(True, False).items()},
    "detrex_dab_detr": lambda: {_to_detrex(k, "dab"): v for k, v in _dab_official_keys(dn=False).items()},
    "detrex_dino": _detrex_dino_keys,
    "detrkit": lambda: {k: tuple(v.shape) for k, v in build_detr(num_classes=K, **TINY).state_dict().items()},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_is_detected_from_the_keys(layout):
    assert detect_format(_random(LAYOUTS[layout]())).name == layout


def test_unknown_layout_is_an_error_naming_the_keys():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*foo.weight"):
        detect_format({"foo.weight": torch.zeros(1)})


def _save_official_dino(path, num_classes=K):
    state = _random(_dino_official_keys(), shared_heads=True)
    if num_classes != K:
        state = _with_classes(state, num_classes, shared_heads=True)
    # the official training script's checkpoint: the model plus its argparse settings
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, dn_number=100), "epoch": 11}, path)
    return state


def test_official_dino_checkpoint_loads_through_create_model(tmp_path):
    state = _save_official_dino(tmp_path / "checkpoint0011_4scale.pth")
    model = create_model("dino_r50_4scale", weights=tmp_path / "checkpoint0011_4scale.pth", **TINY_DINO)
    own = model.state_dict()
    assert model.num_classes == K  # taken from the checkpoint's class head
    assert torch.equal(own["decoder.layers.1.norm2.weight"], state["transformer.decoder.layers.1.norm2.weight"])
    assert torch.equal(own["enc_out_class_embed.weight"], state["transformer.enc_out_class_embed.weight"])
    assert torch.equal(own["backbone.body.layer3.1.bn2.running_var"], state["backbone.0.body.layer3.1.bn2.running_var"])


def test_coco_checkpoints_keep_coco_ids_and_names(tmp_path):
    _save_official_dino(tmp_path / "official.pth", num_classes=91)
    _, meta = load_pretrained("dino_r50_4scale", tmp_path / "official.pth", **TINY_DINO)
    assert meta["num_classes"] == 91 and meta["label_to_cat"] == list(range(91))
    assert (meta["class_names"][1], meta["class_names"][18], meta["class_names"][12]) == ("person", "dog", "N/A")

    torch.save({"model": _with_classes(_random(_detrex_dino_keys()), 80)}, tmp_path / "detrex.pth")
    model, meta = load_pretrained("dino_r50_4scale", tmp_path / "detrex.pth", **TINY_DINO)
    assert model.num_classes == 80 and meta["model_args"]["share_heads"] is False  # detrex's layout, implied
    assert meta["label_to_cat"][:3] == [1, 2, 3] and meta["label_to_cat"][-1] == 90
    assert meta["class_names"][0] == "person" and meta["class_names"][-1] == "toothbrush"


def test_other_num_classes_reinitialises_only_the_class_heads(tmp_path):
    state = _save_official_dino(tmp_path / "ckpt.pth")
    with pytest.warns(UserWarning, match="re-initialised for fine-tuning"):
        model, meta = load_pretrained("dino_r50_4scale", tmp_path / "ckpt.pth", num_classes=3, **TINY_DINO)
    own = model.state_dict()
    assert own["class_embed.0.weight"].shape[0] == 3 and own["label_enc.weight"].shape[0] == 4
    assert set(meta["source"]["reinitialised"]) == {k for k in own if CLASS_DEPENDENT.search(k)}
    assert torch.equal(own["decoder.layers.0.linear1.weight"], state["transformer.decoder.layers.0.linear1.weight"])
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]


def test_wrong_family_names_the_presets_that_fit(tmp_path):
    _save_official_dino(tmp_path / "ckpt.pth")
    with pytest.raises(
        CheckpointError, match=r"IDEA-Research/DINO DINO checkpoint.*Presets that fit: .*dino_r50_4scale"
    ):
        create_model("detr_r50", weights=tmp_path / "ckpt.pth")


def test_mismatched_architecture_lists_the_keys(tmp_path):
    torch.save({"model": _random(_official_keys(refine=True, two_stage=False))}, tmp_path / "refine.pth")
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.bbox_embed\.0\.layers\.0\.bias"):
        create_model("deformable_detr_r50", weights=tmp_path / "refine.pth", **TINY, n_points=POINTS)
    # the right preset loads it
    create_model("deformable_detr_r50_refine", weights=tmp_path / "refine.pth", **TINY, n_points=POINTS)



def test_separate_heads_into_a_shared_head_preset_is_an_error(tmp_path):
    """Plain Deformable DETR shares one class head across decoder layers; a file holding a different head per layer
    (transformers 5.0 writes such files) must not load with the last one silently winning."""
    state = _random(_official_keys(refine=False, two_stage=False), shared_heads=True)
    torch.save({"model": state}, tmp_path / "same.pth")
    create_model("deformable_detr_r50", weights=tmp_path / "same.pth", **TINY, n_points=POINTS)  # one head: loads
    state = dict(state)
    for i in range(1, DEC):  # the official layout stores the shared head under every index: make them differ
        state[f"class_embed.{i}.weight"] = torch.randn_like(state["class_embed.0.weight"])
        state[f"class_embed.{i}.bias"] = state["class_embed.0.bias"].clone()
    torch.save({"model": state}, tmp_path / "separate.pth")
    with pytest.raises(
        CheckpointError, match=r"different values for class_embed\.0\.weight and class_embed\.1\.weight"
    ):
        create_model("deformable_detr_r50", weights=tmp_path / "separate.pth", **TINY, n_points=POINTS)

class _Payload:
    """Pickles to a call that would write a file, the classic checkpoint exploit."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="never unpickles code"):
        read_state_dict(tmp_path / "bad.pth")
    assert not marker.exists()


def test_ddp_prefix_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _random(_dino_official_keys(), shared_heads=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    for file in ("w.safetensors", "ddp.pth"):
        loaded, _ = read_state_dict(tmp_path / file)
        assert sorted(loaded) == sorted(state)


def _file_url(path) -> str:
    return path.resolve().as_uri()


def test_download_verifies_sha256_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DETRKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "release.pth"
    _save_official_dino(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    got = download(_file_url(src), sha256=digest[:8], progress=False)
    assert got.read_bytes() == src.read_bytes() and got.parent == tmp_path / "cache" / "downloads"
    assert download(_file_url(src), sha256=digest, progress=False) == got  # cached, full digest matches too
    other = tmp_path / "other" / "release.pth"
    other.parent.mkdir()
    other.write_bytes(b"not the release")
    with pytest.raises(CheckpointError, match="invalid hash value"):
        download(_file_url(other), sha256=digest[:8], progress=False)
    assert [p.name for p in (tmp_path / "cache" / "downloads").iterdir()] == [got.name]  # nothing half-written kept


def test_weights_coco_downloads_converts_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DETRKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "dino_release.pth"
    state = _save_official_dino(src, num_classes=91)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setitem(model_info("dino_r50_4scale").weights, "coco", Weights(_file_url(src), 0.49, "test", digest))
    model = create_model("dino_r50_4scale", weights="coco", **TINY_DINO)
    assert torch.equal(model.state_dict()["tgt_embed.weight"], state["transformer.tgt_embed.weight"])
    converted = list((tmp_path / "cache" / "converted").glob("*.safetensors"))
    assert len(converted) == 1
    src.unlink()  # later loads read the converted file, not the release
    for d in (tmp_path / "cache" / "downloads").iterdir():
        d.unlink()
    again, meta = load_pretrained(
        "dino_r50_4scale", create_model.__globals__["resolve_weights"]("dino_r50_4scale", "coco")
    )
    assert torch.equal(again.state_dict()["tgt_embed.weight"], state["transformer.tgt_embed.weight"])
    assert meta["class_names"][18] == "dog"


def test_unknown_weights_tag_is_an_error():
    with pytest.raises(CheckpointError, match="dino_lite has no released weights 'coco'"):
        create_model("dino_lite", weights="coco")


def test_convert_cli_reports_and_writes_a_detrkit_checkpoint(tmp_path, capsys):
    _save_official_dino(tmp_path / "ckpt.pth", num_classes=91)
    out = tmp_path / "dino.safetensors"
    args = ["convert", str(tmp_path / "ckpt.pth"), "--model", "dino_r50_4scale", "-o", str(out), "--model_args",
            '{"backbone": "resnet18", "d_model": 32, "nhead": 4, "num_encoder_layers": 2, "num_decoder_layers": 3, '
            '"dim_feedforward": 64, "num_queries": 10, "n_points": 2}']
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "layout official_dino (IDEA-Research/DINO)" in text
    assert re.search(r"ignored: 6\n  6 x the decoder's reference to class_embed", text)  # 3 layers x weight + bias
    assert "-> 277 of the 277 tensors" in text and "missing: 0" in text and "classes: 91 (person, bicycle" in text
    from detrkit import Detector

    detector = Detector(out)
    assert detector.meta["model"] == "dino_r50_4scale" and detector.cat_to_name[18] == "dog"
    assert len(detector.predict(torch.rand(3, 64, 80), threshold=0.0)) > 0
    # fine-tuning conversion: class heads re-initialised, reported as missing
    assert main(args[:5] + [str(tmp_path / "ft.safetensors"), "--num_classes", "4"] + args[6:]) == 0
    text = capsys.readouterr().out  # 3 decoder class heads + the encoder's (weight, bias) + the label embedding
    assert "missing: 9 (class heads re-initialised for 4 classes" in text and "-> 268 of the 277 tensors" in text


def test_predict_cli_with_official_weights_draws_coco_names(tmp_path):
    """`detrkit predict IMG --model detr_r50 --weights detr-r50.pth`: a full-size official-layout checkpoint whose
    class head is set to prefer COCO id 18 ("dog") everywhere."""
    import json

    from PIL import Image

    source = create_model("detr_r50")
    with torch.no_grad():
        source.class_embed.bias.zero_()
        source.class_embed.bias[18] = 20.0
    torch.save({"model": official_detr_state(source)}, tmp_path / "detr-r50.pth")
    Image.new("RGB", (96, 72), (120, 90, 60)).save(tmp_path / "photo.jpg")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "photo.jpg"), "--model", "detr_r50", "--weights",
                 str(tmp_path / "detr-r50.pth"), "--output", str(out), "--threshold", "0.5"]) == 0
    dets = json.loads((out / "detections.json").read_text())["photo.jpg"]
    assert len(dets) == 100 and {d["name"] for d in dets} == {"dog"} and {d["label"] for d in dets} == {18}
    assert (out / "photo.jpg").is_file()


def test_eval_maps_predictions_through_the_checkpoint_label_space(synth_dir, tmp_path, capsys):
    """A COCO-id model (91 outputs) scored on a dataset with fewer categories: predictions keep the model's ids."""
    import json

    from conftest import TINY as TINY_ANY

    from detrkit.data.coco_classes import coco_label_space
    from detrkit.weights.files import save_weights

    ids, names = coco_label_space(91)
    model = create_model("detr_lite", num_classes=91, **TINY_ANY)
    meta = {"model": "detr_lite", "num_classes": 91, "model_args": TINY_ANY, "class_names": names,
            "label_to_cat": ids, "image_size": 64}
    save_weights(tmp_path / "coco.safetensors", model, meta)
    assert main(["eval", "--checkpoint", str(tmp_path / "coco.safetensors"), "--data", str(synth_dir),
                 "--output", str(tmp_path / "m.json")]) == 0
    assert 0.0 <= json.loads((tmp_path / "m.json").read_text())["AP"] <= 1.0


def test_checkpoints_saved_with_renamed_builder_settings_still_load(tmp_path):
    from detrkit import load_checkpoint
    from detrkit.weights.files import save_weights

    model = create_model("dn_dab_detr_lite", num_classes=3, ffn_activation="relu", denoising={"num_dn_pairs": 7})
    old_args = {"activation": "relu", "denoising": {"num_queries": 7}}  # the names before the renames
    with pytest.raises(TypeError):  # control: today's builder does not take the old name
        model_info("dn_dab_detr_lite").builder(num_classes=3, **old_args)
    meta = {"model": "dn_dab_detr_lite", "num_classes": 3, "model_args": old_args, "class_names": ["a", "b", "c"],
            "label_to_cat": [1, 2, 3]}
    save_weights(tmp_path / "old.safetensors", model, meta)
    loaded, _ = load_checkpoint(tmp_path / "old.safetensors")
    assert isinstance(loaded.decoder.layers[0].activation, torch.nn.ReLU)
    assert loaded.denoising.num_dn_pairs == 7
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_detrkit_file_given_to_another_preset_names_the_one_it_was_saved_from(tmp_path):
    """A dfine_n checkpoint given to dfine_s (another size of the same family): the error names dfine_n."""
    from detrkit.weights.files import save_weights

    meta = {"model": "dfine_n", "num_classes": 3, "model_args": {}, "class_names": list("abc"),
            "label_to_cat": [1, 2, 3], "image_size": 640}
    save_weights(tmp_path / "n.safetensors", create_model("dfine_n", num_classes=3), meta)
    with pytest.raises(CheckpointError, match=r"does not fit DFINE(.|\n)*saved from dfine_n: "
                                              r"create_model\('dfine_n', weights=...\) loads it"):
        create_model("dfine_s", weights=tmp_path / "n.safetensors")
    assert create_model("dfine_n", weights=tmp_path / "n.safetensors").num_classes == 3
