"""Trainers and white-box tools: folders they did not write, two runs at once, resumes that
change the experiment, unchecked numbers, recipes that misbehave, a full disk."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from crate_alpha import cli, run_folder

from crate_alpha.clip import trainer as clip_trainer
from crate_alpha.classifier import trainer as cls_trainer
from crate_alpha.recipe import RecipeError
from crate_alpha.whitebox.commands import WhiteboxError, diagnose, explain

DEMO_PRETRAIN = "clipa_crate_alpha_L14_84_pretrain:demo"
CLS_SCRATCH = "cls_crate_alpha_B16_in21k_pretrain:demo"


def _user_folder(path, names):
    path.mkdir(parents=True)
    for name in names:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(f"the user's {name}\n")
    return {name: (path / name).read_text() for name in names}


def _unchanged(path, before):
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == set(before)
    assert all((path / n).read_text() == text for n, text in before.items())


def _clip_over(demo_data, logs, name, *extra):
    return [f"train_data={demo_data[1]['train_shards']}", f"logs={logs}", f"name={name}", "global_batch=32",
            "train_num_samples=64", *extra]


def _cls_over(demo_data, out, name, *extra):
    return [f"train_data={demo_data[0] / 'imagefolder' / 'train'}", f"output={out}", f"experiment={name}",
            "epochs=1", "global_batch=32", "train_num_samples=64", "workers=0", *extra]


# ---- a run folder is the run's own -------------------------------------------------------

def test_trainers_refuse_a_folder_they_did_not_write(demo_data, tmp_path, no_model_build):
    cls_files = ["recipe.json", "summary.json", "curves.png", "train_log.jsonl", "checkpoints/.x.partial-1"]
    before = _user_folder(tmp_path / "cls" / "mine", cls_files)
    with pytest.raises(run_folder.RunFolderError, match=f"{tmp_path / 'cls' / 'mine'} is not empty and is not "
                       "written by crate-alpha"):
        cls_trainer.train(CLS_SCRATCH, _cls_over(demo_data, tmp_path / "cls", "mine"))
    _unchanged(tmp_path / "cls" / "mine", before)

    before = _user_folder(tmp_path / "clip" / "mine", ["recipe.json", "params.txt", "train_summary.json", "out.log"])
    for dry in (True, False):
        with pytest.raises(run_folder.RunFolderError, match="is not empty and is not written by crate-alpha"):
            clip_trainer.run(DEMO_PRETRAIN, _clip_over(demo_data, tmp_path / "clip", "mine"), dry_run=dry)
    _unchanged(tmp_path / "clip" / "mine", before)
    # a folder of the other trainer is not taken either
    run_folder.claim(tmp_path / "clip" / "cls-run", run_folder.CLASSIFIER_RUN)
    (tmp_path / "clip" / "cls-run" / "notes.txt").write_text("x")
    with pytest.raises(run_folder.RunFolderError, match="is a crate-alpha classifier training run folder"):
        clip_trainer.run(DEMO_PRETRAIN, _clip_over(demo_data, tmp_path / "clip", "cls-run"), dry_run=True)


def test_a_second_run_into_a_busy_folder_is_refused_with_the_first_pid(demo_data, tmp_path, no_model_build):
    folder = tmp_path / "busy"
    run_folder.claim(folder, run_folder.CLIP_RUN)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from crate_alpha import run_folder
        with run_folder.locked({str(folder)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_folder.RunFolderError, match=f"in use by a run still going \\(pid {holder.pid}\\)"):
            clip_trainer.run(DEMO_PRETRAIN, _clip_over(demo_data, tmp_path, "busy"))
        run_folder.claim(tmp_path / "cbusy", run_folder.CLASSIFIER_RUN)
        with run_folder.locked(tmp_path / "cbusy"):
            # flock is per open file: a second run in this very process is refused as well
            with pytest.raises(run_folder.RunFolderError, match=f"pid {os.getpid()}"):
                cls_trainer.train(CLS_SCRATCH, _cls_over(demo_data, tmp_path, "cbusy"))
    finally:
        holder.kill()
        holder.wait()
    with run_folder.locked(folder):  # the lock went with its process (as it does on kill -9)
        pass


# ---- a resume is the same experiment ---------------------------------------------------------

def test_clip_resume_refuses_a_changed_optimiser_or_data(demo_data, tmp_path):
    over = _clip_over(demo_data, tmp_path, "r", "epochs=1")
    info = clip_trainer.run(DEMO_PRETRAIN, over, dry_run=True)
    run_dir = run_folder.claim(tmp_path / "r", run_folder.CLIP_RUN)
    (run_dir / "recipe.json").write_text(json.dumps(info))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "epoch_latest.pt").write_bytes(b"")
    clip_trainer.run(DEMO_PRETRAIN, over + ["workers=0", "log_every_n_steps=5"], dry_run=True)  # how it runs: fine
    for change, said in [("wd=0.1", "wd 0.2 -> 0.1"), ("beta2=0.98", "beta2 0.95 -> 0.98"),
                         ("grad_clip_norm=2.0", "grad_clip_norm 1.0 -> 2.0"),
                         (f"train_data={demo_data[1]['train_shards'].replace('00005', '00004')}", "train_data")]:
        with pytest.raises(RecipeError, match=f"holds a run of another recipe \\({said}"):
            clip_trainer.run(DEMO_PRETRAIN, over + [change], dry_run=True)
    assert json.loads((run_dir / "recipe.json").read_text()) == json.loads(json.dumps(info))


def test_classifier_resume_refuses_a_changed_key(demo_data, tmp_path):
    cfg = cls_trainer.load(CLS_SCRATCH, _cls_over(demo_data, tmp_path, "r"))
    run_dir = run_folder.claim(tmp_path / "r", run_folder.CLASSIFIER_RUN)
    torch.save({"recipe": json.dumps(dict(cfg, weight_decay=0.3), default=str)}, run_dir / "checkpoints.pt")
    (run_dir / "checkpoints").mkdir()
    os.replace(run_dir / "checkpoints.pt", run_dir / "checkpoints" / "latest.pt")
    with pytest.raises(RecipeError, match="another recipe \\(weight_decay 0.3 -> 0.05\\)"):
        cls_trainer.train(CLS_SCRATCH, _cls_over(demo_data, tmp_path, "r"))


def test_resumed_clip_run_repeats_the_uninterrupted_run(demo_data, tmp_path):
    """Epoch 2 resumed from epoch 1's checkpoint gives the weights the uninterrupted run had."""
    a = clip_trainer.run(DEMO_PRETRAIN, _clip_over(demo_data, tmp_path, "a", "epochs=2", "workers=2", "save_frequency=1"))
    ckpts = tmp_path / "a" / "checkpoints"
    b = run_folder.claim(tmp_path / "b", run_folder.CLIP_RUN)
    (b / "checkpoints").mkdir()
    shutil.copy(ckpts / "epoch_1.pt", b / "checkpoints" / "epoch_latest.pt")
    shutil.copy(tmp_path / "a" / "recipe.json", b / "recipe.json")
    clip_trainer.run(DEMO_PRETRAIN, _clip_over(demo_data, tmp_path, "b", "epochs=2", "workers=2"))
    assert "resuming checkpoint" in (b / "out.log").read_text()
    want = torch.load(ckpts / "epoch_2.pt", weights_only=True)["state_dict"]
    got = torch.load(b / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    assert a["schedule"]["epochs"] == 2 and want.keys() == got.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst < 1e-6, f"resumed weights differ by up to {worst}"
    # the first run's records are kept; the resumption is a row of its own
    assert json.loads((b / "recipe.json").read_text()) == json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert (b / "params.txt").is_file() and len(open(b / "segments.jsonl").readlines()) == 1


# ---- numbers and recipes ---------------------------------------------------------------------

@pytest.mark.parametrize("bad, said", [
    ("epochs=0", "epochs must be a whole number >= 1 \\(or None\\), got 0"),
    ("epochs=-3", "epochs must be a whole number >= 1"),
    ("global_batch=-64", "global_batch must be a whole number >= 1, got -64"),
    ("global_batch=0", "global_batch must be a whole number >= 1, got 0"),
    ("lr_per_256=nan", "lr_per_256 must be a finite number > 0, got 'nan'"),
    ("samples_seen=0", "samples_seen must be a finite number > 0"),
    ("beta2=1.5", "beta2 must be a number in \\[0, 1\\)"),
])
def test_clip_schedule_values_are_checked(bad, said, no_model_build):
    with pytest.raises(RecipeError, match=said):
        clip_trainer.load(DEMO_PRETRAIN, [bad])


@pytest.mark.parametrize("bad, said", [
    ("epochs=0", "epochs must be a whole number >= 1, got 0"),
    ("global_batch=0", "global_batch must be a whole number >= 1, got 0"),
    ("lr_base=float('nan')", "lr_base must be a finite number > 0"),
    ("smoothing=1.0", "smoothing must be a number in \\[0, 1\\)"),
])
def test_classifier_values_are_checked(bad, said):
    with pytest.raises(RecipeError, match=said):
        cls_trainer.load(CLS_SCRATCH, [bad])


@pytest.mark.parametrize("body, said", [
    ("def get_config(arg=None):\n    return 1 / 0\n", "failed while loading \\(line 2\\): ZeroDivisionError"),
    ("import nonexistent_module_xyz\n", "failed while loading \\(line 1\\): ModuleNotFoundError"),
    ("def get_config(:\n", "failed while loading \\(line 1\\): SyntaxError"),
    ("def get_config():\n    return ['epochs', 1]\n", "get_config\\(\\) returned a list, not a dict"),
    ("import sys\nsys.exit(0)\n", "called sys.exit\\(0\\) while loading"),
    ("import sys\ndef get_config(arg=None):\n    sys.exit(3)\n", "called sys.exit\\(3\\)"),
])
def test_a_misbehaving_recipe_is_one_line(tmp_path, body, said, capsys):
    recipe = tmp_path / "bad_recipe.py"
    recipe.write_text(body)
    with pytest.raises(RecipeError, match=f"recipe {recipe} {said}"):
        clip_trainer.load(str(recipe))
    assert cli.main(["pretrain", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(recipe) in err


# ---- a full disk -----------------------------------------------------------------------------

def test_a_full_disk_leaves_no_truncated_checkpoint(tmp_path):
    """open_clip_train's epoch_N.pt and our checkpoints, written past a 64 KB file-size limit."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "epoch_latest.pt").write_bytes(b"whole")
    code = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from crate_alpha.common import CrateAlphaError, save_checkpoint
        from crate_alpha.clip.patches import _torch_view
        from crate_alpha.device import for_name
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit gives EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        big = {{"state_dict": {{"w": torch.zeros(100_000)}}}}
        for save, name in ((_torch_view(for_name("cpu")).save, "epoch_2.pt"), (save_checkpoint, "latest.pt")):
            try:
                save(big, {str(ckpts)!r} + "/" + name)
            except CrateAlphaError as e:
                print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("no space left to write") for line in lines), r.stdout
    assert "epoch_2.pt" in lines[0] and "latest.pt" in lines[1]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_latest.pt"]
    assert (ckpts / "epoch_latest.pt").read_bytes() == b"whole"


# ---- white-box tools -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return timm.create_model("crate_alpha_demo_patch8_64", pretrained=False).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("imgs")
    for i, arr in enumerate(load_sample_images().images):
        Image.fromarray(arr).resize((96, 64)).save(folder / f"{i}.png")
    return folder


def test_explain_and_diagnose_keep_out_of_user_folders(tiny_model, images, tmp_path):
    before = _user_folder(tmp_path / "mine", ["explain.json", "000_0.png", "diagnostics.json", "diagnostics.png"])
    with pytest.raises(run_folder.RunFolderError, match=f"{tmp_path / 'mine'} is not empty and is not written"):
        explain([images], tiny_model, tmp_path / "mine")
    with pytest.raises(run_folder.RunFolderError, match=f"{tmp_path / 'mine'} is not empty and is not written"):
        diagnose(tiny_model, images, tmp_path / "mine")
    _unchanged(tmp_path / "mine", before)
    for _ in range(2):  # its own folder is written again
        assert len(explain([images], tiny_model, tmp_path / "ex")) == 2
        assert diagnose(tiny_model, images, tmp_path / "dg")["images"] == 2
    with pytest.raises(run_folder.RunFolderError, match="is a crate-alpha explain output folder"):
        diagnose(tiny_model, images, tmp_path / "ex")


@pytest.mark.parametrize("size", [0, -8, 12])
def test_whitebox_size_is_checked(tiny_model, images, tmp_path, size):
    with pytest.raises(WhiteboxError, match=f"--size {size} is not a positive multiple of the model's patch size 8"):
        diagnose(tiny_model, images, tmp_path / "d", size=size)
    with pytest.raises(WhiteboxError, match=f"--size {size}"):
        explain([images], tiny_model, tmp_path / "e", size=size)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_explain_on_a_hostile_tar_is_one_line(tiny_model, images, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(WhiteboxError, match=f"{bad} is not a readable tar shard"):
        explain([bad], tiny_model, tmp_path / "e")
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    with pytest.raises(WhiteboxError, match=f"{fifo} is not a regular file"):
        diagnose(tiny_model, fifo, tmp_path / "d")
    assert not (tmp_path / "e").exists()

