"""The released weights through huggingface_hub, against a loopback Hub (``HF_ENDPOINT``).

The server (tests/hub_server.py) speaks the Hub's resolve protocol and serves
official-layout files that the tests write under the released paths. Each load runs in a
fresh interpreter with its own ``HF_HOME``, since huggingface_hub reads its settings at
import: so a second, ``HF_HUB_OFFLINE=1`` run shows what the cache alone gives.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reference_official as ref
from conftest import FIXTURES
from crate_alpha.models import released
from hub_server import serve_hub

TESTS = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "crate-alpha")
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "digit", "number", ".",
              "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "this", "is", "an"]


def hub_env(hf_home, endpoint, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(TESTS),
               CRATE_ALPHA_FIXTURES=str(FIXTURES), **extra)
    return env


def run(args, env, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=TESTS, timeout=timeout, check=False)


def run_py(code, env):
    r = run([sys.executable, "-c", code], env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _put(root, repo, path, src=None, data=None):
    target = Path(root) / repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copy(src, target)
    else:
        target.write_bytes(data)
    return target


def _tokenizer_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                            "do_lower_case": True, "model_max_length": 512}))
    return path


def _big_vision_release_file(dest):
    """The shared big_vision classifier tree as the release stores it: params/ beside optimizer state."""
    tree = dict(np.load(FIXTURES / "bigvision" / "crate_cls_params.npz"))
    full = {f"params/{k}": v for k, v in tree.items()}
    full.update({f"opt/mu/{k}": np.zeros_like(v) for k, v in tree.items()})
    full["chrono/step"] = np.array(7)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        np.savez(f, **full)


# Every released tag, at the shared fixtures' sizes: size arguments shrink the named model
# and pretrained_cfg_overlay gives the fixture's class count, so timm keeps the head.
EVERY_TAG = r"""
import json, numpy as np, timm, torch
from conftest import FIXTURES, rel_err
from crate_alpha.models import released

cls_io = torch.load(FIXTURES / "official_torch" / "crate_alpha_cls_shared.io.pt", weights_only=True)
clipa_io = torch.load(FIXTURES / "official_torch" / "crate_alpha_clipa_shared.io.pt", weights_only=True)
bv_io = np.load(FIXTURES / "bigvision" / "crate_cls_io.npz")
small = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
out = {"listed": sorted(timm.list_pretrained("crate_alpha*")), "errors": {}}
for r in released.RELEASES:
    if r.kind == "clipa":    # timm's view of a CLIPA file: the image tower, head = the image projection
        n, x, want = 128, clipa_io["images"], clipa_io["image_features"]
    elif r.kind == "big_vision":
        n, x, want = 10, torch.from_numpy(bv_io["images"]).permute(0, 3, 1, 2), torch.from_numpy(bv_io["logits"])
    else:
        n, x, want = 10, cls_io["images"], cls_io["logits"]
    m = timm.create_model(r.name, pretrained=True, pretrained_cfg_overlay=dict(num_classes=n), **small).eval()
    with torch.no_grad():
        out["errors"][r.name] = rel_err(m(x), want)
print(json.dumps(out))
"""


def test_every_tag_resolves_and_gives_the_reference_outputs(tmp_path):
    root = tmp_path / "hub"
    for r in released.RELEASES:
        if r.kind == "classifier":
            _put(root, released.REPO, r.path, FIXTURES / "official_torch" / "crate_alpha_cls_shared.pth")
        elif r.kind == "clipa":
            _put(root, released.REPO, r.path, FIXTURES / "official_torch" / "crate_alpha_clipa_shared.pth")
        else:
            _big_vision_release_file(root / released.REPO / r.path)
    with serve_hub(root) as (endpoint, log):
        first = run_py(EVERY_TAG, hub_env(tmp_path / "hf", endpoint))
        # every released file was asked for by its released path (files with equal bytes share one blob in the
        # cache, so huggingface_hub GETs each content once)
        asked = {line.split("/resolve/main/")[1] for line in log}
        assert asked == {r.path for r in released.RELEASES}
        n_requests = len(log)
        again = run_py(EVERY_TAG, hub_env(tmp_path / "hf", endpoint, HF_HUB_OFFLINE="1"))
        assert len(log) == n_requests  # the second load came from the cache alone
    assert first["listed"] == sorted(r.name for r in released.RELEASES)
    assert set(first["errors"]) == {r.name for r in released.RELEASES}
    bad = {k: v for k, v in first["errors"].items() if not v <= 1e-4}
    assert bad == {}
    assert again["errors"] == first["errors"]


FULL_B16 = r"""
import json, timm, torch
import reference_official as ref
from conftest import rel_err

sd = ref.random_classifier_sd(768, 12, 16, 224, 1000)
x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
want = ref.classifier_forward(sd, x, heads=12)[0]
out = {}
for name in ("crate_alpha_base_patch16_224.in21k_ft_in1k", "crate_alpha_base_patch16_224"):  # its tag, the default
    m = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        out[name] = rel_err(m(x), want)
cfg = timm.data.resolve_model_data_config(m)
out["data"] = [cfg["input_size"][1], cfg["crop_pct"], list(cfg["mean"])]
out["license"] = m.pretrained_cfg["license"]
print(json.dumps(out))
"""


def test_full_size_b16_classifier_end_to_end(tmp_path):
    root = tmp_path / "hub"
    torch.save(ref.random_classifier_sd(768, 12, 16, 224, 1000),
               _put(root, released.REPO, "torch/crate_alpha_B16.pth", data=b""))
    with serve_hub(root) as (endpoint, log):
        out = run_py(FULL_B16, hub_env(tmp_path / "hf", endpoint))
    assert out["crate_alpha_base_patch16_224.in21k_ft_in1k"] <= 1e-4
    assert out["crate_alpha_base_patch16_224"] <= 1e-4
    assert out["data"] == [224, 0.875, [0.485, 0.456, 0.406]]  # resize 256, centre crop 224, ImageNet mean
    assert out["license"] == "apache-2.0"
    assert sum(line.startswith("GET") for line in log) == 1  # the default tag is the same file, from the cache


def test_cold_cache_offline_is_one_line(tmp_path):
    with serve_hub(tmp_path / "hub") as (endpoint, log):
        env = hub_env(tmp_path / "hf", endpoint, HF_HUB_OFFLINE="1")
        r = run([CLI, "convert", "official-torch", "crate_alpha_base_patch16_224.in21k_ft_in1k",
                 str(tmp_path / "out")], env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "HF_HUB_OFFLINE" in r.stderr and "torch/crate_alpha_B16.pth" in r.stderr
        r = run([CLI, "explain", "--model", "hf://UCSC-VLAA/CRATE-alpha/torch/crate_alpha_L14.pth",
                 "--out", str(tmp_path / "x"), str(tmp_path)], env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # online, a file the repo lacks
        env = hub_env(tmp_path / "hf", endpoint)
        r = run([CLI, "convert", "official-torch", "hf://UCSC-VLAA/CRATE-alpha/torch/nope.pth",
                 str(tmp_path / "out")], env)
        assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert log and not (tmp_path / "out").exists()


PRETRAINED_DIR = r"""
import json, open_clip, torch
import crate_alpha
import reference_official as ref
from conftest import rel_err

sd = ref.random_clipa_sd(1024, 1, 14, 28, 64, 64, 1, 25, 16)
d = crate_alpha.pretrained_dir("crate-alpha-CLIPA-L-14")
model, _, preprocess = open_clip.create_model_and_transforms(d)
tokenizer = open_clip.get_tokenizer(d)
x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
tokens = tokenizer(["a photo of the digit seven.", "this is a number"])
with torch.no_grad():
    img, txt = model.eval().encode_image(x), model.encode_text(tokens)
print(json.dumps({"dir": d, "image": rel_err(img, ref.clipa_image(sd, x, heads=16)),
                  "text": rel_err(txt, ref.clipa_text(sd, tokens, heads=16)), "tokens": tokens[0, :4].tolist(),
                  "resize": str(preprocess.transforms[0].interpolation)}))
"""


def test_clipa_pretrained_dir_converts_once_into_the_cache(tmp_path):
    root = tmp_path / "hub"
    sd = ref.random_clipa_sd(1024, 1, 14, 28, 64, 64, 1, len(TINY_VOCAB), 16)
    torch.save(sd, _put(root, released.REPO, "torch/crate_alpha_CLIPA_L14.pth", data=b""))
    _tokenizer_dir(root / "bert-base-uncased")  # what the converter asks the Hub for
    with serve_hub(root) as (endpoint, log):
        first = run_py(PRETRAINED_DIR, hub_env(tmp_path / "hf", endpoint))
        n = len(log)
        again = run_py(PRETRAINED_DIR, hub_env(tmp_path / "hf", endpoint, HF_HUB_OFFLINE="1"))
        assert len(log) == n
    assert first["image"] <= 1e-4 and first["text"] <= 1e-4
    assert first["tokens"] == [2, 5, 6, 7]  # [CLS] a photo of: the served vocabulary
    assert "BICUBIC" in first["resize"]
    assert again == first
    folder = Path(first["dir"].removeprefix("local-dir:"))
    assert folder.is_relative_to(tmp_path / "hf") and (folder / "vocab.txt").is_file()


def test_zeroshot_eval_on_the_converted_clipa_fixture(demo_data, tmp_path):
    out, _ = demo_data
    tok = _tokenizer_dir(tmp_path / "tok")
    with serve_hub(tmp_path / "hub") as (endpoint, _):  # an empty Hub: nothing comes from it
        env = hub_env(tmp_path / "hf", endpoint)
        src = str(FIXTURES / "official_torch" / "crate_alpha_clipa_shared.pth")
        r = run([CLI, "convert", "official-torch", src, str(tmp_path / "clipa"), "--heads", "4", "--text-heads", "2",
                 "--tokenizer", str(tok)], env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "clipa" / "vocab.txt").read_text() == (tok / "vocab.txt").read_text()
        r = run([CLI, "zeroshot", "eval", "--model", f"local-dir:{tmp_path / 'clipa'}", "--dataset", "wds/digits",
                 "--dataset-root", str(out / "wds"), "--output", str(tmp_path / "zs.json"), "--workers", "0"], env)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((tmp_path / "zs.json").read_text())
        assert 0.0 <= res["metrics"]["acc1"] <= 1.0
        # without a tokenizer to be had: the folder is written with one warning line, zero-shot refuses in one
        r = run([CLI, "convert", "official-torch", src, str(tmp_path / "bare"), "--heads", "4", "--text-heads", "2"],
                hub_env(tmp_path / "hf", endpoint, HF_HUB_OFFLINE="1"))
        assert r.returncode == 0 and "--tokenizer" in r.stderr and not (tmp_path / "bare" / "vocab.txt").exists()
        r = run([CLI, "zeroshot", "eval", "--model", f"local-dir:{tmp_path / 'bare'}", "--dataset", "wds/digits",
                 "--dataset-root", str(out / "wds"), "--output", str(tmp_path / "zs2.json")], env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "tokenizer" in r.stderr


@pytest.mark.parametrize("ref_name", ["crate-alpha-CLIPA-L-14", "hf://OWNER/REPO"])
def test_reference_parsing(ref_name):
    from crate_alpha.convert import hub

    if ref_name.startswith("hf://"):
        with pytest.raises(hub.HubError, match="hf://OWNER/REPO"):
            hub.parse_reference(ref_name)
        assert hub.parse_reference("hf://a/b@v1/x/y.pth") == hub.HubFile("a/b", "x/y.pth", "v1")
    else:
        assert hub.parse_reference(ref_name) == hub.HubFile(released.REPO, "torch/crate_alpha_CLIPA_L14.pth")
        assert hub.parse_reference("local-dir:/x") is None


def test_a_head_of_another_size_is_named():
    import timm

    small = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    src = str(FIXTURES / "official_torch" / "crate_alpha_cls_shared.pth")  # a 10-class head
    with pytest.raises(ValueError, match=r"10-class head and the model 19167 classes: pass num_classes=10"):
        timm.create_model("crate_alpha_base_patch16_224.in21k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=src), **small)
    # another class count asked for: a new head on the released trunk
    m = timm.create_model("crate_alpha_base_patch16_224.in21k", pretrained=True, num_classes=3,
                          pretrained_cfg_overlay=dict(file=src), **small)
    assert m.num_classes == 3
