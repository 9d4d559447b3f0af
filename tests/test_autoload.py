"""The start-up hook: timm, open_clip and their CLIs know the CRATE-α models without an import.

Every case runs in a fresh interpreter, since the hook acts at start-up: this environment
(``make venv``'s editable install), a regular wheel installed into a scratch venv, the same
wheel under ``pip install --user``, and an editable install of a copy of the tree.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

HEAVY = ("torch", "numpy", "timm", "open_clip", "crate_alpha")
OFF = {"CRATE_ALPHA_AUTOLOAD": "0"}


def py(code, env=None, python=sys.executable, cwd=None, timeout=300):
    """Runs ``code`` in a fresh interpreter (not this test's directory, so nothing is imported from it)."""
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {})
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=full,
                          cwd=cwd or "/", timeout=timeout, check=False)


def test_startup_imports_nothing_heavy():
    r = py(f"import sys; print([m for m in {HEAVY!r} if m in sys.modules], '_crate_alpha_autoload' in sys.modules)")
    assert r.returncode == 0 and r.stdout.split() == ["[]", "True"], r.stderr
    # the hook itself adds one module to a bare interpreter's
    r = py("import sys; sys.modules.pop('_crate_alpha_autoload', None); before = set(sys.modules)\n"
           "import _crate_alpha_autoload; print(sorted(set(sys.modules) - before))", env=OFF)
    assert r.returncode == 0 and r.stdout.strip() == "['_crate_alpha_autoload']", r.stderr


def test_fresh_interpreter_knows_the_models():
    r = py("import open_clip, timm, sys\n"
           "m = open_clip.create_model('crate-alpha-L-14')\n"
           "print(type(m.visual).__name__, sum(p.numel() for p in m.visual.parameters()) // 10**6)\n"
           "t = timm.create_model('crate_alpha_base_patch16_224')\n"
           "print(type(t).__name__, t.num_classes, len(timm.list_pretrained('crate_alpha*')))\n"
           "print([type(f).__name__ for f in sys.meta_path].count('Finder'))")
    assert r.returncode == 0, r.stderr[-3000:]
    visual, clf, finders = r.stdout.strip().splitlines()
    assert visual.split()[0] == "TimmModel" and int(visual.split()[1]) > 250  # the L/14 tower
    assert clf.split() == ["CrateAlpha", "1000", "14"]  # every released file is a pretrained tag
    assert finders == "0"  # the hook fired once and left sys.meta_path


def test_timm_first_then_open_clip_inside():
    # open_clip imports timm while it is itself half-initialised: registration waits for the outermost import
    r = py("import timm; print('crate_alpha_tiny_patch16_224' in timm.list_models('crate_alpha*'))\n"
           "import open_clip; print('crate-alpha-demo' in open_clip.list_models())")
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr[-3000:]
    r = py("import open_clip.factory as f; print('crate-alpha-demo' in f.list_models())")
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr[-3000:]


def test_off_switch():
    r = py("import sys, open_clip, timm\n"
           "print('crate_alpha' in sys.modules, 'crate-alpha-demo' in open_clip.list_models(),"
           " timm.is_model('crate_alpha_tiny_patch16_224'))", env=OFF)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "False"], r.stderr
    r = py("import open_clip; open_clip.create_model('crate-alpha-L-14')", env=OFF)
    assert r.returncode == 1 and "not found" in r.stderr
    # an explicit import still registers everything
    r = py("import crate_alpha, open_clip; print('crate-alpha-L-14' in open_clip.list_models())", env=OFF)
    assert r.stdout.split() == ["True"], r.stderr


def test_failing_package_costs_one_line(tmp_path):
    broken = tmp_path / "crate_alpha"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated failure\\nsecond line')\n")
    r = py("import timm; print(timm.__name__, timm.is_model('crate_alpha_tiny_patch16_224'))",
           env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.split() == ["timm", "False"], r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "crate-alpha:" in lines[0] and "ImportError: simulated failure" in lines[0], lines
    assert "CRATE_ALPHA_AUTOLOAD=0" in lines[0]
    r = py("import timm", env={"PYTHONPATH": str(tmp_path), **OFF})
    assert r.returncode == 0 and r.stderr == ""


# ---- the libraries' own command lines ------------------------------------------------------

def test_open_clip_train_and_clip_benchmark_clis(demo_data, tmp_path):
    out, info = demo_data
    bin_dir = Path(sys.executable).parent
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    train = [sys.executable, "-m", "open_clip_train.main", "--model", "crate-alpha-demo",
             "--train-data", info["train_shards"], "--dataset-type", "webdataset", "--train-num-samples", "64",
             "--batch-size", "32", "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--warmup", "1",
             "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", "plain", "--seed", "0"]
    r = subprocess.run(train, capture_output=True, text=True, env=base, cwd=tmp_path, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "logs" / "plain" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file()
    # the same command, switched off: open_clip_train does not know the model
    r = subprocess.run(train[:-4] + ["--name", "off"], capture_output=True, text=True, env={**base, **OFF},
                       cwd=tmp_path, timeout=600, check=False)
    assert r.returncode != 0 and "crate-alpha-demo" in r.stderr and "not found" in r.stderr

    bench = [str(bin_dir / "clip_benchmark"), "eval", "--model", "crate-alpha-demo", "--pretrained", str(ckpt),
             "--dataset", "wds/digits", "--dataset_root", str(out / "wds"), "--task", "zeroshot_classification",
             "--batch_size", "64", "--num_workers", "0", "--output", str(tmp_path / "zs.json")]
    r = subprocess.run(bench, capture_output=True, text=True, env=base, cwd=tmp_path, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "zs.json").read_text())
    assert res["model"] == "crate-alpha-demo" and 0.0 <= res["metrics"]["acc1"] <= 1.0
    r = subprocess.run(bench, capture_output=True, text=True, env={**base, **OFF}, cwd=tmp_path, timeout=600,
                       check=False)
    assert r.returncode != 0 and "not found" in r.stderr


# ---- other kinds of install ------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of this tree, built offline from a copy (nothing is written into the checkout)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, tree / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, tree / name, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                        str(tree), "-w", str(out)], capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tree, next(out.glob("crate_alpha-*.whl"))


def _scratch_venv(path, system_site=False):
    """A venv without pip whose dependencies are this environment's (a path line, so its .pth hooks stay out)."""
    args = [sys.executable, "-m", "venv", "--without-pip"] + (["--system-site-packages"] if system_site else [])
    subprocess.run(args + [str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    site = Path(py("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def _pip(python, *args, env=None):
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                        "--no-index", *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                       check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


CHECK = ("import sys, timm, open_clip\n"
         "timm.create_model('crate_alpha_tiny_patch16_224'); open_clip.create_model('crate-alpha-demo')\n"
         "print(sys.modules['crate_alpha'].__file__)")


def test_regular_install_in_a_venv(wheel, tmp_path):
    python, site = _scratch_venv(tmp_path / "venv")
    _pip(python, str(wheel[1]))
    assert (site / "crate_alpha_autoload.pth").read_text().strip() == "import _crate_alpha_autoload"
    r = py(CHECK, python=python)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(site)), r.stderr[-3000:]
    assert py(CHECK, python=python, env=OFF).returncode == 1


def test_user_install(wheel, tmp_path):
    python, _ = _scratch_venv(tmp_path / "venv", system_site=True)  # user site-packages are on in such a venv
    env = {"PYTHONUSERBASE": str(tmp_path / "userbase")}
    _pip(python, "--user", str(wheel[1]), env=env)
    r = py(CHECK, python=python, env=env)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(tmp_path / "userbase")), r.stderr[-3000:]


def test_editable_install(wheel, tmp_path):
    tree = wheel[0]
    python, site = _scratch_venv(tmp_path / "venv")
    _pip(python, "--no-build-isolation", "-e", str(tree))
    assert (site / "crate_alpha_autoload.pth").is_file()
    r = py(CHECK, python=python)
    assert r.returncode == 0 and r.stdout.strip() == str(tree / "src" / "crate_alpha" / "__init__.py"), r.stderr
