"""The ``crate-alpha`` command never loses data and fails with one line, not a traceback.

Covers the "Data safety" issue: an OUT_DIR that holds the source or the current
directory, --force over user files, folders left by a kill -9, file modes, and bad input
or write failures that used to end in a traceback.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch

import crate_alpha
import reference_big_vision as ref_bv
import reference_official as ref
from crate_alpha.cli import main
from crate_alpha.convert import folders


def run_cli(capsys, *args) -> tuple:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.err


def assert_one_line_error(capsys, *args, match: str = "") -> str:
    rc, err = run_cli(capsys, *args)
    assert rc == 2, err
    assert err.startswith("crate-alpha: error:"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    return err


def hidden_leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def cls_pth(tmp_path) -> Path:
    """A small official classifier (width 32, 2 heads) in a folder of its own."""
    d = tmp_path / "weights"
    d.mkdir()
    torch.save(ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2), d / "c.pth")
    return d / "c.pth"


def convert_args(src, out, *extra):
    return ["convert", "official-torch", src, out, "--heads", "2", *extra]


# ---- impossible model shapes -----------------------------------------------------------

@pytest.mark.parametrize("name,match", [
    ("crate_alpha_custom.w0_d2_h2_patch8_32", "width 0"),
    ("crate_alpha_custom.w64_d2_h0_patch8_32", "heads 0"),
    ("crate_alpha_custom.w64_d0_h2_patch8_32", "depth 0"),
    ("crate_alpha_custom.w64_d2_h2_patch0_32", "patch size 0"),
    ("crate_alpha_custom.w64_d2_h2_patch8_0", "resolution 0"),
    ("crate_alpha_custom.w64_d2_h2_patch64_32", "patch size 64 is larger than the resolution 32"),
    ("crate_alpha_custom.w64_d2_h3_patch8_32", "width 64 is not divisible by 3 heads"),
])
def test_impossible_shape_names_refused(name, match):
    with pytest.raises(ValueError, match=match):
        crate_alpha.variant_args(name)
    with pytest.raises(ValueError, match=match):
        timm.create_model(name)


def test_shape_arguments_checked_after_overrides():
    with pytest.raises(ValueError, match="heads 0"):
        timm.create_model("crate_alpha_demo_patch8_64", num_heads=0)
    with pytest.raises(ValueError, match="larger than the resolution"):
        timm.create_model("crate_alpha_custom.w64_d1_h2_patch8_32", img_size=4)
    assert timm.create_model("crate_alpha_custom.w64_d1_h2_patch8_8").patch_embed.grid_size == (1, 1)


def test_cli_impossible_shape_is_one_line(capsys, cls_pth, tmp_path):
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o",
                          "--model", "crate_alpha_custom.w32_d1_h0_patch4_8", match="heads 0")
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o",
                          "--model", "crate_alpha_custom.w32_d1_h3_patch4_8", match="not divisible by 3 heads")
    assert not (tmp_path / "o").exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("heads", ["0", "-2"])
def test_nonpositive_heads(capsys, cls_pth, tmp_path, heads):
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o", "--heads", heads,
                          match=f"--heads must be a positive number of heads, got {heads}")
    assert not (tmp_path / "o").exists()


def test_zero_text_heads_not_taken_as_default(capsys, tmp_path):
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=8, embed=16, text_width=16,
                             text_layers=1, vocab=10, context=4)
    torch.save(sd, tmp_path / "clip.pth")
    assert_one_line_error(capsys, "convert", "official-torch", tmp_path / "clip.pth", tmp_path / "o",
                          "--heads", "2", "--text-heads", "0", match="--text-heads")
    assert not (tmp_path / "o").exists()


# ---- bad input files -------------------------------------------------------------------

@pytest.mark.parametrize("member", ["notes.txt", "a.npy"])
def test_zip_that_is_not_an_npz(capsys, tmp_path, member):
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr(member, "hello")
    assert_one_line_error(capsys, "convert", "big-vision", tmp_path / "x.npz", tmp_path / "o",
                          match="not an .npz of arrays")
    assert not (tmp_path / "o").exists() and hidden_leftovers(tmp_path) == []


def test_one_dimensional_conv_weight(capsys, tmp_path):
    sd = ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2)
    sd["conv1.weight"] = torch.zeros(32)
    torch.save(sd, tmp_path / "c.pth")
    assert_one_line_error(capsys, *convert_args(tmp_path / "c.pth", tmp_path / "o"),
                          match="conv1.weight has shape (32,)")
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=8, embed=16, text_width=16,
                             text_layers=1, vocab=10, context=4)
    sd["visual.conv1.weight"] = torch.zeros(32)
    torch.save(sd, tmp_path / "clip.pth")
    assert_one_line_error(capsys, *convert_args(tmp_path / "clip.pth", tmp_path / "o"),
                          match="visual.conv1.weight has shape (32,)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("obj", [{0: torch.zeros(2)}, {"state_dict": {0: torch.zeros(2), "a": torch.zeros(1)}}])
def test_integer_keys(capsys, tmp_path, obj):
    torch.save(obj, tmp_path / "c.pth")
    assert_one_line_error(capsys, *convert_args(tmp_path / "c.pth", tmp_path / "o"),
                          match="keys that are not parameter names")
    assert_one_line_error(capsys, "export", tmp_path / "c.pth", tmp_path / "o", "--model", "crate-alpha-demo",
                          match="keys that are not parameter names")
    assert not (tmp_path / "o").exists()


# ---- export of bad checkpoints ---------------------------------------------------------

@pytest.fixture
def demo_ckpt(tmp_path) -> Path:
    """A checkpoint as open_clip_train writes it (DDP's ``module.`` prefix included)."""
    model = open_clip.create_model("crate-alpha-demo")
    d = tmp_path / "run"
    d.mkdir()
    torch.save({"epoch": 1, "name": "demo", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               d / "epoch_1.pt")
    return d / "epoch_1.pt"


def test_export_works_and_replaces_its_own_folder(capsys, demo_ckpt, tmp_path):
    out = tmp_path / "exported"
    assert run_cli(capsys, "export", demo_ckpt, out, "--model", "crate-alpha-demo")[0] == 0
    assert run_cli(capsys, "export", demo_ckpt, out, "--model", "crate-alpha-demo", "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    open_clip.create_model(f"local-dir:{out}")


def test_export_bad_checkpoints(capsys, demo_ckpt, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert_one_line_error(capsys, "export", tmp_path / "notes.txt", out, "--model", "crate-alpha-demo",
                          match="not a PyTorch checkpoint")
    torch.save({"state_dict": {"visual.proj": "text", "epoch": 3}}, tmp_path / "mixed.pt")
    assert_one_line_error(capsys, "export", tmp_path / "mixed.pt", out, "--model", "crate-alpha-demo",
                          match="entries that are not tensors: visual.proj, epoch")
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}}, tmp_path / "lacking.pt")
    assert_one_line_error(capsys, "export", tmp_path / "lacking.pt", out, "--model", "crate-alpha-demo",
                          match="missing keys: ")
    full = torch.load(demo_ckpt, weights_only=True)
    full["state_dict"]["module.text_projection"] = torch.zeros(3, 3)
    torch.save(full, tmp_path / "misshapen.pt")
    assert_one_line_error(capsys, "export", tmp_path / "misshapen.pt", out, "--model", "crate-alpha-demo",
                          match="size mismatch for text_projection")
    assert_one_line_error(capsys, "export", demo_ckpt, out, "--model", "crate-alpha-demo", "--image-size", "0",
                          match="--image-size must be a positive number")
    assert_one_line_error(capsys, "export", demo_ckpt, out, "--model", "crate-alpha-demo", "--image-size", "4",
                          match="patch size 8 is larger than the resolution 4")
    assert not out.exists() and hidden_leftovers(tmp_path) == []


# ---- failures while writing ------------------------------------------------------------

def test_out_under_a_regular_file(capsys, cls_pth, tmp_path):
    (tmp_path / "file.txt").write_text("keep")
    assert_one_line_error(capsys, *convert_args(cls_pth, tmp_path / "file.txt" / "out"),
                          match="cannot write")
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_unwritable_parent(capsys, cls_pth, tmp_path, monkeypatch):
    # Tests run as root, which ignores permission bits; stand in for a chmod 0500 parent.
    monkeypatch.setattr(folders.os, "access", lambda *a, **k: False)
    assert_one_line_error(capsys, *convert_args(cls_pth, tmp_path / "out"), match="cannot write")
    assert not (tmp_path / "out").exists()


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_enospc(*a, **k):
    # What safetensors itself raises when the disk fills up.
    from safetensors import SafetensorError
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')


def _json_eacces(obj, path):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


@pytest.mark.parametrize("name,fail", [("save_file", _enospc), ("save_file", _safetensors_enospc),
                                       ("write_json", _json_eacces)])
def test_write_failure_leaves_nothing(capsys, cls_pth, tmp_path, monkeypatch, name, fail):
    monkeypatch.setattr(folders, name, fail)
    out = tmp_path / "out"
    reason = "Permission denied" if name == "write_json" else "No space left on device"
    err = assert_one_line_error(capsys, *convert_args(cls_pth, out), match=f"cannot write {out}: {reason}")
    assert ".partial-" not in err
    assert not out.exists() and hidden_leftovers(tmp_path) == []


def test_full_disk_keeps_the_previous_folder(capsys, cls_pth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, *convert_args(cls_pth, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(folders, "save_file", _enospc)
    assert_one_line_error(capsys, *convert_args(cls_pth, out, "--force"), match="No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden_leftovers(tmp_path) == []


# ---- OUT_DIR that would destroy the source or the working directory --------------------

def test_out_is_the_source_folder(capsys, cls_pth):
    data = cls_pth.read_bytes()
    assert_one_line_error(capsys, *convert_args(cls_pth, cls_pth.parent, "--force"),
                          match=f"output folder {cls_pth.parent} is or contains the source")
    assert cls_pth.read_bytes() == data
    assert hidden_leftovers(cls_pth.parent.parent) == []


def test_out_is_an_ancestor_of_the_source(capsys, tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    torch.save(ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2), deep / "c.pth")
    assert_one_line_error(capsys, *convert_args(deep / "c.pth", tmp_path / "a", "--force"), match="the source")
    assert (deep / "c.pth").is_file()


def test_out_holds_the_target_of_a_symlinked_source(capsys, cls_pth, tmp_path):
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "c.pth").symlink_to(cls_pth)
    assert_one_line_error(capsys, *convert_args(tmp_path / "links" / "c.pth", cls_pth.parent, "--force"),
                          match="the source")
    assert cls_pth.is_file()


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_out_is_the_working_directory_or_above(capsys, cls_pth, monkeypatch, out):
    monkeypatch.chdir(cls_pth.parent)
    (cls_pth.parent / "notes.txt").write_text("mine")
    assert_one_line_error(capsys, *convert_args("c.pth", out, "--force"), match="the current directory")
    assert cls_pth.is_file() and (cls_pth.parent / "notes.txt").read_text() == "mine"
    assert hidden_leftovers(cls_pth.parent) == [] and hidden_leftovers(cls_pth.parent.parent) == []


def test_big_vision_out_is_the_source_folder(capsys, tmp_path):
    tree = ref_bv.random_crate_tree(np.random.default_rng(0), width=32, depth=1, heads=2, patch=4, res=8, n_out=3)
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "x.npz", **tree)
    for src in (tmp_path / "src" / "x.npz", f"{tmp_path / 'src' / 'x.npz'}:img"):
        assert_one_line_error(capsys, "convert", "big-vision", src, tmp_path / "src", "--force", match="the source")
    assert (tmp_path / "src" / "x.npz").is_file()
    assert run_cli(capsys, "convert", "big-vision", tmp_path / "src" / "x.npz", tmp_path / "o")[0] == 0


def test_export_out_is_the_checkpoint_folder(capsys, demo_ckpt):
    assert_one_line_error(capsys, "export", demo_ckpt, demo_ckpt.parent, "--model", "crate-alpha-demo", "--force",
                          match="the source")
    assert demo_ckpt.is_file()


# ---- --force replaces only what this tool wrote ----------------------------------------

def _timm_like_folder(out: Path, architecture: str) -> None:
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architecture": architecture, "pretrained_cfg": {}}))
    (out / "model.safetensors").write_bytes(b"user weights")


@pytest.mark.parametrize("make", [
    lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")),
    lambda out: (out.mkdir(), (out / "sub").mkdir()),
    lambda out: _timm_like_folder(out, "resnet50"),  # our file names, someone else's model
    lambda out: (_timm_like_folder(out, "crate_alpha_demo_patch8_64"), (out / "notes.txt").write_text("mine")),
])
def test_force_refuses_user_files(capsys, cls_pth, tmp_path, make):
    out = tmp_path / "out"
    make(out)
    before = sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*"))
    assert_one_line_error(capsys, *convert_args(cls_pth, out, "--force"), match="empty it yourself")
    assert sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*")) == before
    assert hidden_leftovers(tmp_path) == []


def test_force_replaces_an_empty_folder_and_its_own_folders(capsys, cls_pth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(capsys, *convert_args(cls_pth, out, "--force"))[0] == 0
    assert run_cli(capsys, *convert_args(cls_pth, out, "--force"))[0] == 0
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=8, embed=16, text_width=16,
                             text_layers=1, vocab=10, context=4)
    torch.save(sd, tmp_path / "clip.pth")
    # an open_clip folder of ours replaces a timm folder of ours, and back
    assert run_cli(capsys, *convert_args(tmp_path / "clip.pth", out, "--text-heads", "1", "--force"))[0] == 0
    assert (out / "open_clip_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert run_cli(capsys, *convert_args(cls_pth, out, "--force"))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert hidden_leftovers(tmp_path) == []


# ---- folders left by kill -9, and file modes -------------------------------------------

@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664),
                                                      (0o077, 0o700, 0o600)])
def test_modes_follow_the_umask(capsys, cls_pth, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        assert run_cli(capsys, *convert_args(cls_pth, tmp_path / "out"))[0] == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "config.json": file_mode, "model.safetensors": file_mode}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(parent: Path, name: str, marker=None, age_s: float = 0.0) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    if marker is not None:
        (d / folders.WRITER_MARKER).write_text(json.dumps(marker))
    if age_s:
        t = time.time() - age_s
        for p in (*d.iterdir(), d):
            os.utime(p, (t, t))
    return d


def test_stale_partials_of_this_out_are_removed(capsys, cls_pth, tmp_path):
    here = folders.writer_record(os.getpid())
    dead = folders.writer_record(_dead_pid())
    stale = [
        _hidden(tmp_path, ".out.partial-dead0001", dead),
        _hidden(tmp_path, ".out.old-dead0002", dead),
        _hidden(tmp_path, ".out.partial-reused01", {**here, "start": (here["start"] or 0) + 12345}),
        _hidden(tmp_path, ".out.partial-rebooted", {**here, "boot": "another-boot"}),
        _hidden(tmp_path, ".out.partial-nomark01", None, age_s=2 * folders.MARKERLESS_STALE_S),
        _hidden(tmp_path, ".out.partial-farold01", {**here, "host": "elsewhere"}, age_s=2 * folders.FOREIGN_STALE_S),
    ]
    kept = [
        _hidden(tmp_path, ".out.partial-live0001", here),  # a writer at work right now
        _hidden(tmp_path, ".out.partial-nomark02", None),  # too young to tell
        _hidden(tmp_path, ".out.partial-farnew01", {**here, "host": "elsewhere"}),
        _hidden(tmp_path, ".outx.partial-dead0003", dead),  # another OUT_DIR's
        _hidden(tmp_path, ".out.partial-short", dead),  # not a name atomic_dir makes
        _hidden(tmp_path, "out.partial-dead0004", dead),
    ]
    (tmp_path / ".out.partial-afile001").write_text("a file, not ours")
    assert run_cli(capsys, *convert_args(cls_pth, tmp_path / "out"))[0] == 0
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept) and (tmp_path / ".out.partial-afile001").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from crate_alpha.convert import convert_official_torch, folders

real = folders._save_tensors

def save_then_hang(state, path):
    real(state, path)
    Path(sys.argv[3]).write_text("saved")
    time.sleep(600)

folders._save_tensors = save_then_hang
convert_official_torch(sys.argv[1], sys.argv[2], heads=2)
"""


def test_kill_9_mid_conversion_is_cleaned_by_the_next_run(capsys, cls_pth, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "saved.flag"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(cls_pth), str(out), str(flag)])
    try:
        deadline = time.time() + 120
        while not flag.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the writer did not get to its save"
        partials = [q for q in tmp_path.iterdir() if q.name.startswith(".out.partial-")]
        assert len(partials) == 1
        # a run beside a live writer leaves that writer's folder alone
        assert run_cli(capsys, *convert_args(cls_pth, out))[0] == 0
        assert partials[0].is_dir()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert (partials[0] / "model.safetensors").exists()
    assert run_cli(capsys, *convert_args(cls_pth, out, "--force"))[0] == 0
    assert hidden_leftovers(tmp_path) == []
    assert sorted(q.name for q in out.iterdir()) == ["config.json", "model.safetensors"]


def test_marker_never_reaches_the_output(capsys, cls_pth, tmp_path):
    assert run_cli(capsys, *convert_args(cls_pth, tmp_path / "out"))[0] == 0
    assert not (tmp_path / "out" / folders.WRITER_MARKER).exists()
