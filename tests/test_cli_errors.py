"""Every ``loctex`` sub-command fails with one line, ``loctex <cmd>: <file>: <reason>``, and a
non-zero exit; ``--debug`` shows the traceback instead."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loctex.cli import main
from loctex.models.resnet import build_resnet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    sd = build_resnet("resnet18").state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(5, 5, 3, 3)
    torch.save(sd, d / "wrong_shapes.pth")
    (d / "garbage.pth").write_bytes(b"this is not a torch file")
    (d / "a_file").write_text("x")
    return d


# (argv with {d} for the fixture directory, the exact start of the one stderr line)
CASES = [
    (["synth", "--out", "{d}/a_file/out", "--num-images", "2"],
     "loctex synth: {d}/a_file/out"),  # the path synth tried under it, then "Not a directory"
    (["tokenizer", "train", "--narratives", "{d}/none.jsonl", "--out", "{d}/tok.json"],
     "loctex tokenizer train: no such file: {d}/none.jsonl"),
    (["prepare", "--narratives", "{d}/none.jsonl", "--images", "{d}", "--out", "{d}/prepared"],
     "loctex prepare: {d}/none.jsonl: "),
    (["export", "--checkpoint", "{d}/no_run", "--format", "torchvision", "--out", "{d}/x.pth"],
     "loctex export: {d}/no_run: "),
    (["export", "--checkpoint", "{d}/wrong_shapes.pth", "--format", "torchvision", "--out", "{d}/x.pth"],
     "loctex export: {d}/wrong_shapes.pth: "),
    (["eval", "dense", "--weights", "{d}/wrong_shapes.pth", "--data", "{d}"],
     "loctex eval dense: {d}/wrong_shapes.pth: does not fit a resnet18: size mismatch for "
     "layer2.0.conv1.weight"),
    (["eval", "dense", "--weights", "{d}/garbage.pth", "--data", "{d}"],
     "loctex eval dense: {d}/garbage.pth: not a weights-only torch file"),
    (["eval", "dense", "--weights", "random", "--arch", "resnet18"],
     "loctex eval dense: give --data DIR"),
    (["eval", "voc07", "--weights", "random", "--voc-root", "{d}/no_voc"],
     "loctex eval voc07: {d}/no_voc: "),
    (["eval", "localization", "--weights", "{d}/no_run", "--data", "{d}"],
     "loctex eval localization: {d}/no_run: "),
    (["eval", "detection", "--weights", "{d}/wrong_shapes.pth", "--coco-root", "{d}", "--out", "{d}/d.json"],
     "loctex eval detection: "),
    (["reproduce", "--config", "{d}/none.yaml", "--out", "{d}/r"],
     "loctex reproduce: {d}/none.yaml: "),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_errors_are_one_line_naming_command_and_file(files, capsys, argv, expected):
    rc = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(expected.format(d=files)), err


def test_debug_flag_lets_the_traceback_through(files):
    with pytest.raises(ValueError, match="does not fit a resnet18"):
        main(["--debug", "eval", "dense", "--weights", str(files / "wrong_shapes.pth"),
              "--data", str(files)])


def test_the_installed_command_exits_non_zero_with_one_line(files):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "loctex", "export", "--checkpoint", str(files / "no_run"),
            "--format", "torchvision", "--out", str(files / "x.pth")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 1
    assert plain.stderr.strip().startswith(f"loctex export: {files / 'no_run'}: "), plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True,
                           env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_usage_errors_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--format", "torchvision"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err
