"""The one command line: every subcommand, one error tail, the layout's forwards, an installed package."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from crate_alpha import cli

REPO = Path(__file__).resolve().parents[1]
CRATE_ALPHA = str(Path(sys.executable).parent / "crate-alpha")


def _commands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(cli.parser()))


def test_every_capability_is_a_subcommand():
    top = {c[0] for c in COMMANDS}
    assert {"convert", "export", "data", "pretrain", "finetune", "cls-train", "cls-eval", "zeroshot", "explain",
            "diagnose", "segment-eval", "bench", "model-table", "demo", "demo-cls", "demo-segment"} <= top
    assert {("data", c) for c in ("download", "verify", "demo", "bench")} <= set(COMMANDS)
    assert {("zeroshot", c) for c in ("eval", "imagenet", "table")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0 and "usage: crate-alpha" in capsys.readouterr().out


def _run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=cwd)


def test_one_error_tail(tmp_path):
    cases = [
        (CRATE_ALPHA, "cls-train", "no_such_recipe"),
        (CRATE_ALPHA, "pretrain", "clipa_crate_alpha_L14_84_pretrain:demo", f"train_data={tmp_path}/{{0..3}}.tar"),
        (CRATE_ALPHA, "cls-eval", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "e.json")),
        (CRATE_ALPHA, "zeroshot", "eval", "--model", "no-such-model", "--dataset", "wds/x", "--dataset-root",
         str(tmp_path), "--output", str(tmp_path / "z.json")),
        (CRATE_ALPHA, "data", "verify", str(tmp_path / "none")),
        (CRATE_ALPHA, "convert", "official-torch", str(tmp_path / "none.pth"), str(tmp_path / "out")),
    ]
    for args in cases:
        r = _run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("crate-alpha: error: "), (args, r.stderr[-800:])
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_layout_forwards_to_the_same_commands(tmp_path):
    r = _run(sys.executable, "-m", "data_pipeline", "verify", str(tmp_path / "none"), cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("python -m data_pipeline: error: ")
    (tmp_path / "a.json").write_text(json.dumps({"model": "m", "dataset": "d", "metrics": {"acc1": 0.5}}))
    r = _run(sys.executable, "-m", "zeroshot", "table", str(tmp_path / "a.json"), "--out", str(tmp_path / "t"),
             cwd=REPO)
    assert r.returncode == 0 and "50.00" in r.stdout and (tmp_path / "t.csv").is_file()


def test_installed_package_finds_its_recipes(tmp_path):
    # run from a folder with no checkout around it: the recipes ship in the package
    r = _run(CRATE_ALPHA, "recipes", cwd=tmp_path)
    assert r.returncode == 0 and "clipa_crate_alpha_L14_84_pretrain" in r.stdout
    from data_helpers import write_tar

    write_tar(tmp_path / "0.tar", [(f"{i:03d}", {"jpg": b"x", "txt": b"y"}) for i in range(8)])
    r = _run(CRATE_ALPHA, "pretrain", "clipa_crate_alpha_L14_84_pretrain:demo", "train_data=0.tar", "--dry-run",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    info = json.loads(r.stdout)
    assert info["train_num_samples"] == 8 and "--force-image-size" in info["open_clip_train_args"]
