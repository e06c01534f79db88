"""Every way `encoder train` / `encoder evaluate` on a user's collection can go wrong ends in
one line on stderr and exit code 2, no traceback; and the no-split collection trains from the
command line, saying what it held out."""
import json
import re
import shutil
from pathlib import Path

import pytest

from encoder.cli import main
from test_own_training import own_collection, tiny_train_config


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refusing an option the CLI does not have
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, cmd: str, *words: str) -> None:
    """Exit code 2 and one line on stderr (besides progress bars), naming what went wrong."""
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and "%|" not in l]
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"encoder {cmd}: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    """A training config with tiny random backbones (fast), as a user's --config file."""
    path = tmp_path / "tiny.json"
    path.write_text(tiny_train_config(tmp_path / "unused", tmp_path).model_dump_json())
    return path


@pytest.fixture()
def broken_inputs(tmp_path, tiny_checkpoint) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pairs.jsonl").write_text("\n")
    bad = own_collection(tmp_path / "bad", 3)
    with (bad / "pairs.jsonl").open("a") as f:
        f.write('{"image": "photos/p0.jpg", "captions": ["unterminated"\n')
    truncated = tmp_path / "truncated_ckpt"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    garbled = tmp_path / "garbled_ckpt"
    shutil.copytree(tiny_checkpoint, garbled)
    (garbled / "config.json").write_text("{not json")
    return {"missing": tmp_path / "no_such_folder", "empty": empty, "bad": bad, "truncated": truncated,
            "garbled": garbled, "good": own_collection(tmp_path / "good", 4)}


@pytest.mark.parametrize("case,words", [
    ("missing", ["no captions file at", "no_such_folder"]),
    ("empty", ["no images"]),
    ("bad", ["pairs.jsonl:4:", "JSON syntax error"]),
])
def test_train_refuses_a_bad_collection_in_one_line(case, words, broken_inputs, tiny_config, tmp_path, capsys):
    out = tmp_path / f"run_{case}"
    rc, _, err = run_cli(["train", "--config", str(tiny_config), "--data", str(broken_inputs[case]), "--out", str(out)],
                         capsys)
    assert_one_line_error(rc, err, "train", *words)
    assert not out.exists()  # nothing half-made


@pytest.mark.parametrize("case,words", [
    ("missing", ["is not a checkpoint folder"]),
    ("truncated", ["cannot load checkpoint", "truncated_ckpt"]),
    ("garbled", ["cannot load checkpoint", "garbled_ckpt"]),
])
def test_train_refuses_an_unreadable_init_checkpoint_in_one_line(case, words, broken_inputs, tiny_config, tmp_path,
                                                                capsys):
    data = own_collection(tmp_path / "mine", 48)
    rc, _, err = run_cli(["train", "--config", str(tiny_config), "--data", str(data), "--out", str(tmp_path / "run"),
                          "--init-from", str(broken_inputs[case])], capsys)
    assert_one_line_error(rc, err, "train", *words)


def test_train_refuses_too_few_photos_in_one_line(tiny_config, tmp_path, capsys):
    data = own_collection(tmp_path / "mine", 25)
    rc, _, err = run_cli(["train", "--config", str(tiny_config), "--data", str(data), "--out", str(tmp_path / "run")],
                         capsys)
    assert_one_line_error(rc, err, "train", "too few captioned photos", "25", "at least 40")


def test_train_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": "many", "batch_size": -1, "no_such_option": 1}))
    rc, _, err = run_cli(["train", "--config", str(cfg), "--data", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "train", "validation error")


@pytest.mark.parametrize("argv,words", [
    (["--data", "{missing}"], ["no captions file at"]),
    (["--data", "{empty}"], ["no images"]),
    (["--data", "{bad}"], ["pairs.jsonl:4:"]),
    (["--data", "{good}", "--split", "test"], ["no images in split 'test'"]),
    (["--data", "{good}", "--checkpoint", "{missing}"], ["is not a checkpoint folder"]),
    (["--data", "{good}", "--checkpoint", "{truncated}"], ["cannot load checkpoint", "truncated_ckpt"]),
    (["--data", "{good}", "--checkpoint", "{garbled}"], ["cannot load checkpoint", "garbled_ckpt"]),
])
def test_evaluate_refuses_bad_input_in_one_line(argv, words, broken_inputs, capsys):
    argv = [a.format(**broken_inputs) for a in argv]
    rc, _, err = run_cli(["evaluate", *argv], capsys)
    assert_one_line_error(rc, err, "evaluate", *words)


def test_evaluate_refuses_a_missing_photo_in_one_line(tmp_path, tiny_checkpoint, capsys):
    data = own_collection(tmp_path / "mine", 4)
    (data / "photos" / "p2.jpg").unlink()
    rc, _, err = run_cli(["evaluate", "--data", str(data), "--checkpoint", str(tiny_checkpoint)], capsys)
    assert_one_line_error(rc, err, "evaluate", "p2.jpg")


def test_train_and_evaluate_a_collection_without_splits_from_the_command_line(tiny_config, tmp_path, capsys):
    data = own_collection(tmp_path / "mine", 50)
    rc, out, err = run_cli(["train", "--config", str(tiny_config), "--data", str(data), "--out", str(tmp_path / "run")],
                           capsys)
    assert rc == 0, err
    assert "training on 42 photos, validating on 8: no val split in the collection: carved 8 photos" in out
    ckpt = tmp_path / "run" / "checkpoint"
    rc, out, err = run_cli(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--k", "5"], capsys)
    assert rc == 0, err
    assert "50 images x 75 captions" in out
