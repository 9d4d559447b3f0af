"""The training input pipeline (crate_alpha.data.loader) through the seams the trainers use."""
import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from crate_alpha.clip.patches import ClipRun, get_data_for
from crate_alpha.data import loader as L
from crate_alpha.data.decode import SkipCounter
from crate_alpha.data.digits import digit_image, jpeg_q95, write_tar
from crate_alpha.device import CpuDevice

DIGITS = load_digits()


def _sample(i, caption=None, label=True):
    files = {"jpg": jpeg_q95(digit_image(DIGITS.data[i], 64))}
    if caption is not False:
        files["txt"] = (caption or f"a photo of the digit {DIGITS.target[i]}").encode()
    if label:
        files["cls"] = str(int(DIGITS.target[i])).encode()
    return f"s{i:05d}", files


def _shards(folder: Path, sizes) -> str:
    i = 0
    for k, n in enumerate(sizes):
        write_tar(folder / f"{k:05d}.tar", [_sample(i + j) for j in range(n)])
        i += n
    return str(folder / ("{00000..%05d}.tar" % (len(sizes) - 1)))


def _clip_args(pattern, n, batch=2, workers=1, seed=0):
    return argparse.Namespace(train_data=pattern, val_data=None, dataset_type="webdataset", dataset_resampled=False,
                              train_num_samples=n, batch_size=batch, world_size=1, rank=0, workers=workers, seed=seed)


def _clip_preprocess():
    import open_clip

    return open_clip.image_transform(64, is_train=True), open_clip.image_transform(64, is_train=False)


def test_damaged_shards_and_samples_through_the_training_loader_are_skipped_and_counted(tmp_path):
    import open_clip

    write_tar(tmp_path / "00000.tar", [_sample(j) for j in range(8)])
    damaged = _sample(8)
    damaged[1]["jpg"] = damaged[1]["jpg"][:40]  # a JPEG cut after its header
    write_tar(tmp_path / "00001.tar", [damaged, _sample(9, caption=False), _sample(10), _sample(11)])
    write_tar(tmp_path / "00002.tar", [_sample(12 + j) for j in range(4)])
    whole = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(whole[:700])  # a shard cut inside its first member
    counter = SkipCounter()
    run = ClipRun(CpuDevice(), counter, fast_decode=True)
    get_data = get_data_for(run, original=None)  # never called: this is a webdataset training run
    tokenizer = open_clip.get_tokenizer("crate-alpha-demo")
    data = get_data(_clip_args(str(tmp_path / "{00000..00002}.tar"), n=10), _clip_preprocess(), tokenizer=tokenizer)
    loader = data["train"].dataloader
    assert loader.num_batches == 5 and loader.num_samples == 10
    batches = list(loader)
    # one pass: the 8 + 2 good samples; the cut JPEG, the sample without a caption and the cut shard counted
    assert len(batches) == 5 and counter.count == 3
    images, texts = batches[0]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 64) and texts.shape[0] == 2


def _labels(loader, epochs=2):
    out = []
    for epoch in range(epochs):
        loader[2].set_epoch(epoch)
        out.append([(int(y), round(float(x.sum()), 3)) for xs, ys in loader[0] for x, y in zip(xs, ys)])
    return out


def _classifier_loader(pattern, seed, workers=2):
    from crate_alpha.classifier.data import make_loader

    def augment(image):  # a random crop's worth of randomness, drawn in the loader worker
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).mean()
        return x * torch.rand(()) + torch.randint(0, 1000, ())

    return make_loader(pattern, augment, batch_size=4, train=True, workers=workers, seed=seed)


def test_a_classifier_shard_run_repeats_with_the_same_seed(tmp_path):
    pattern = _shards(tmp_path, [10, 10, 10, 10])
    a, b, c = (_labels(_classifier_loader(pattern, seed)) for seed in (0, 0, 1))
    assert a == b, "the same seed gave another order or augmentation"
    assert a != c and a[0] != a[1], "the order does not follow the seed and the epoch"
    # each shard read by exactly one of the two workers: every sample once per epoch
    labels = sorted(int(t) for t in DIGITS.target[:40])
    assert all(sorted(y for y, _ in epoch) == labels for epoch in a)


def test_prefetch_and_shared_memory_collation(tmp_path):
    pattern = _shards(tmp_path, [4, 4])
    sample = L.ToPair(lambda b: torch.ones(3), "cls", L.class_label)
    epoch = L.Epoch()
    pipeline = L.shard_pipeline(pattern_list(pattern), sample, 2, train=True, seed=0, epoch=epoch,
                                counter=SkipCounter())
    loader = L.loader(pipeline, workers=1, prefetch_factor=5)
    assert loader.pipeline[0].prefetch_factor == 5  # WebLoader wraps a torch DataLoader
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].shape == (2, 3) and batches[0][0].is_shared()


def pattern_list(pattern):
    from crate_alpha.data.shards import expand_shards

    return expand_shards(pattern)


def test_fewer_shards_than_workers_is_one_clear_error(tmp_path):
    import open_clip

    from crate_alpha.errors import DataError

    pattern = _shards(tmp_path, [4])
    get_data = get_data_for(ClipRun(CpuDevice()), original=None)
    with pytest.raises(DataError, match="1 shard.* 2 loader worker"):
        get_data(_clip_args(pattern, 4, workers=2), _clip_preprocess(), tokenizer=open_clip.get_tokenizer("RN50"))


def test_fast_decode_follows_open_clips_transform():
    from crate_alpha.clip.patches import fast_image_transform

    train, val = _clip_preprocess()
    fast = fast_image_transform(train)
    crop = fast.transforms[0]
    assert (crop.size, crop.scale) == (64, (0.9, 1.0))
    assert fast_image_transform(val) is None  # not a random resized crop: open_clip's own transform runs
