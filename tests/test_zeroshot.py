"""Zero-shot runner pieces that need no model: the ImageNet root and the results table."""
import json

import pytest
import torch

from crate_alpha.clip.zeroshot import clip_benchmark_eval, imagenet_root, results_table
from crate_alpha.errors import CheckpointError, DataError, ModelConfigError


def test_imagenet_root_from_plain_val_folder(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
        (val / f"n{i:08d}" / "x.png").write_bytes(buf.getvalue())
    root = imagenet_root(str(val), str(tmp_path / "root"))
    wnid_to_classes, _ = torch.load(f"{root}/meta.bin", weights_only=False)
    assert len(wnid_to_classes) == 1000 and (tmp_path / "root" / "val").resolve() == val.resolve()
    from torchvision.datasets import ImageNet
    ds = ImageNet(root, split="val")  # what clip_benchmark builds for imagenet1k
    assert len(ds.classes) == 1000


def test_imagenet_root_refuses_other_folders(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="1 class folders; ImageNet-1K validation needs 1000"):
        imagenet_root(str(tmp_path / "val"), str(tmp_path / "root"))
    with pytest.raises(DataError, match="does not exist"):
        imagenet_root(str(tmp_path / "nope"), str(tmp_path / "root"))


def test_results_table(tmp_path):
    for i, acc in enumerate([0.9, 0.8]):
        (tmp_path / f"r{i}.json").write_text(json.dumps({
            "dataset": "wds/digits", "model": f"m{i}", "pretrained": "x.pt", "task": "zeroshot_classification",
            "metrics": {"acc1": acc, "acc5": 1.0, "mean_per_class_recall": acc}}))
    md = results_table([str(tmp_path / "r0.json"), str(tmp_path / "r1.json")], str(tmp_path / "table"))
    assert "| m0 |" in md and "90.00" in md and "80.00" in md
    csv = (tmp_path / "table.csv").read_text().splitlines()
    assert csv[0].startswith("file,model") and len(csv) == 3


def test_unknown_model_and_missing_checkpoint(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown model 'nope'.*crate-alpha-L-14"):
        clip_benchmark_eval("nope", "wds/digits", str(tmp_path), str(tmp_path / "o.json"))
    with pytest.raises(CheckpointError, match="does not exist"):
        clip_benchmark_eval("crate-alpha-demo", "wds/digits", str(tmp_path), str(tmp_path / "o.json"),
                            checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="not an open_clip model folder"):
        clip_benchmark_eval(f"local-dir:{tmp_path}", "wds/digits", str(tmp_path), str(tmp_path / "o.json"))


def test_zeroshot_retrieval_through_clip_benchmark(demo_data, tmp_path):
    """Retrieval on a clip_benchmark wds retrieval set (image + captions), with a training-style checkpoint."""
    import tarfile

    import open_clip

    from crate_alpha.data.digits import CLASSNAMES
    from data_helpers import write_tar

    samples = []
    with tarfile.open(demo_data[0] / "wds" / "test" / "0.tar") as tar:
        files = {}
        for m in tar:
            key, _, ext = m.name.partition(".")
            files.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key, f in list(files.items())[:40]:
        name = CLASSNAMES[int(f["cls"])]
        samples.append((key, {"jpg": f["jpg"], "txt": f"a handwritten {name}.\nthe digit {name}.".encode()}))
    root = tmp_path / "ret"
    (root / "test").mkdir(parents=True)
    write_tar(root / "test" / "0.tar", samples)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    # an open_clip name with no checkpoint evaluates the freshly initialised model
    r0 = clip_benchmark_eval("crate-alpha-demo", "wds/digits_retrieval", str(root), str(tmp_path / "r0.json"),
                             task="zeroshot_retrieval")
    assert r0["task"] == "zeroshot_retrieval"
    model = open_clip.create_model("crate-alpha-demo")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "ckpt.pt")
    r = clip_benchmark_eval("crate-alpha-demo", "wds/digits_retrieval", str(root), str(tmp_path / "r.json"),
                            checkpoint=str(tmp_path / "ckpt.pt"), task="zeroshot_retrieval")
    assert r["task"] == "zeroshot_retrieval"
    assert 0 <= r["metrics"]["image_retrieval_recall@5"] <= 1 and 0 <= r["metrics"]["text_retrieval_recall@5"] <= 1


def test_attention_maps_and_curves(tmp_path):
    import open_clip

    from crate_alpha.whitebox.interpret import attention
    from crate_alpha.visualize import open_clip_losses, plot_curves
    from crate_alpha.whitebox.commands import plot_attention

    trunk = open_clip.create_model("crate-alpha-demo").visual.trunk
    x = torch.randn(2, 3, 64, 64)
    maps = attention(trunk, x)
    assert maps.shape == (2, 4, 4, 8, 8)
    assert torch.isfinite(maps).all()
    assert (maps.sum((-1, -2)) <= 1 + 1e-5).all()  # a softmax row, minus the class token's own share
    assert plot_attention(trunk, x, x.sigmoid(), tmp_path / "a.png").stat().st_size > 0
    log = tmp_path / "out.log"
    log.write_text("2026 | INFO | Train Epoch: 0 [  64/1472 (4%)] Data (t): 0.3 Contrastive_loss: 4.2 (4.2) Loss: 4.2\n"
                   "2026 | INFO | Train Epoch: 0 [1472/1472 (100%)] Data (t): 0.3 Contrastive_loss: 3.5 (3.6) Loss: 3.5\n")
    pts = open_clip_losses(log)
    assert pts == [(64 / 1472, 4.2), (1.0, 3.5)]
    assert plot_curves({"run": pts}, tmp_path / "c.png").stat().st_size > 0
