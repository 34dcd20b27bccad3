"""Every command, given the path mistakes users make, exits non-zero with one readable line and no traceback."""

import pytest

from detrkit.cli import main


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not an image, not a checkpoint")
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    return {"file": str(a_file), "folder": str(folder), "missing": str(tmp_path / "missing"),
            "under_file": str(a_file / "out")}


CASES = {  # name: argv with {file}, {folder}, {missing}, {under_file}
    "train: missing data": ["train", "--data", "{missing}", "--progress", "false"],
    "train: data is a file": ["train", "--data", "{file}", "--progress", "false"],
    "train: empty folder": ["train", "--data", "{folder}", "--progress", "false"],
    "train: resume a missing run": ["train", "--data", "{folder}", "--resume", "{missing}", "--progress", "false"],
    "eval: missing checkpoint": ["eval", "--checkpoint", "{missing}", "--data", "{folder}"],
    "eval: checkpoint is a text file": ["eval", "--checkpoint", "{file}", "--images", "{folder}", "--ann", "{file}"],
    "predict: missing checkpoint": ["predict", "{folder}", "--checkpoint", "{missing}"],
    "predict: checkpoint is an empty folder": ["predict", "{file}", "--checkpoint", "{folder}"],
    "predict: missing source": ["predict", "{missing}", "--checkpoint", "{folder}"],
    "explain: missing image": ["explain", "{missing}", "--checkpoint", "{folder}"],
    "export: missing checkpoint": ["export", "--checkpoint", "{missing}"],
    "convert: missing source": ["convert", "{missing}", "--model", "detr_r50", "--output", "{folder}/x.safetensors"],
    "data check: missing": ["data", "check", "{missing}"],
    "data check: a text file": ["data", "check", "{file}"],
    "data convert: not a dataset": ["data", "convert", "{folder}", "-o", "{missing}"],
    "data synth: output under a file": ["data", "synth", "--out", "{under_file}", "--num_train", "1", "--num_val",
                                        "1"],
    "demo: output under a file": ["demo", "--quick", "true", "--output", "{under_file}"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_are_one_line_errors(case, paths, capsys):
    argv = [a.format(**paths) for a in CASES[case]]
    rc = main(argv)  # an uncaught exception would fail the test here, with its traceback
    err = capsys.readouterr().err
    assert rc != 0, f"{case}: exit status 0"
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "img/s" not in line]
    assert lines and lines[-1].startswith(f"detrkit {argv[0]}") and "Traceback" not in err, err


@pytest.mark.parametrize(("args", "says"), [(["--model", "detr_lite", "--scale_jitter", "0.5"], "RT-DETR family"),
                                            (["--scale_jitter", "1.5"], "[0, 1)"),
                                            (["--photometric", "hsv"], "rtdetr, yolo, none")])
def test_an_augmentation_that_does_not_fit_is_a_one_line_error(args, says, synth_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(synth_dir), "--output_dir", str(tmp_path / "run"), "--progress", "false",
               *args])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"detrkit train: error: {args[-2].lstrip('-')}") and says in last, err
