"""The digits demo corpus: downloaded train shards, clip_benchmark wds test split, ImageFolder."""
import json

from crate_alpha.data.digits import CLASSNAMES
from crate_alpha.data.verify import verify_folder
from data_helpers import read_shards


def test_demo_corpus(demo_data):
    out, info = demo_data
    assert info["train_samples"] + info["test_samples"] == 1797
    assert info["download"]["failures_by_reason"] == {}
    reports = verify_folder(out / "train")
    assert all(r.ok for r in reports) and sum(r.samples for r in reports) == info["train_samples"]
    samples, counts = read_shards(out / "train")
    assert max(counts.values()) == 1
    one = next(iter(samples.values()))
    label = json.loads(one["json"])["label"]
    assert CLASSNAMES[label] in one["txt"].decode()
    n_val = sum(1 for _ in (out / "imagefolder" / "val").rglob("*.png"))
    n_train = sum(1 for _ in (out / "imagefolder" / "train").rglob("*.png"))
    assert n_val == info["test_samples"] and n_train == info["train_samples"]
    assert sorted(p.name for p in (out / "imagefolder" / "val").iterdir()) == sorted(CLASSNAMES)


def test_clip_benchmark_reads_the_test_split(demo_data):
    from clip_benchmark.datasets.builder import build_dataset

    out, info = demo_data
    ds = build_dataset("wds/digits", root=str(out / "wds"), transform=lambda im: im.size, split="test")
    assert ds.classes == CLASSNAMES and "{c}" in ds.templates[0]
    items = list(ds)
    assert len(items) == info["test_samples"]
    assert items[0][0] == (64, 64) and 0 <= int(items[0][1]) <= 9


def test_fresh_deletes_only_run_folders_the_demo_wrote(tmp_path):
    import pytest

    from crate_alpha.common import CrateAlphaError
    from crate_alpha.apps.demo import DEMO_RUN, clear_runs
    from crate_alpha.data.ownership import mark

    ours, theirs, missing = tmp_path / "scratch", tmp_path / "clip_init", tmp_path / "none"
    for f in (ours, theirs):
        f.mkdir()
        (f / "notes.txt").write_text("keep")
    mark(ours, DEMO_RUN)
    with pytest.raises(CrateAlphaError, match="not written by crate-alpha"):
        clear_runs([ours, theirs])
    assert (ours / "notes.txt").exists() and (theirs / "notes.txt").exists()  # nothing deleted
    clear_runs([ours, missing])
    assert not ours.exists() and (theirs / "notes.txt").exists()
    # a demo stopped during a training left the trainer's mark on its run folder: --fresh clears it too
    from crate_alpha import run_folder

    stopped = run_folder.claim(tmp_path / "crate-alpha_pretrain", run_folder.CLIP_RUN)
    (stopped / "out.log").write_text("Start epoch 0")
    clear_runs([stopped])
    assert not stopped.exists() and (theirs / "notes.txt").exists()
