"""Data pipeline: img2dataset round trip over loopback, resume, verify, damaged shards, fast decode."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from crate_alpha.data import verify as verify_mod
from crate_alpha.data.decode import SkipCounter, decode_crop, shard_loader, train_transform
from crate_alpha.data.download import DataError, download
from data_helpers import RoutesServer, SilentServer, jpeg_bytes, read_shards, sha, write_tar


def _bomb_png() -> bytes:
    # Just above PIL's limit (MAX_IMAGE_PIXELS), which PIL itself only warns about until
    # twice the limit; the pipeline rejects it outright.
    side_w, side_h = 9500, 9500  # 90.25 M pixels > 89.48 M
    assert side_w * side_h > Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("L", (side_w, side_h), 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    good = {f"g{i:02d}": jpeg_bytes(i) for i in range(12)}
    full = jpeg_bytes(99)
    routes = {f"/{k}.jpg": v for k, v in good.items()}
    text, bomb = b"this is not an image at all" * 10, _bomb_png()
    routes["/text.jpg"] = text
    routes["/trunc.jpg"] = full[: len(full) // 2]
    routes["/bomb.png"] = bomb
    server, silent = RoutesServer(routes), SilentServer()
    rows = [{"uid": k, "url": f"{server.url}/{k}.jpg", "text": f"caption {k}", "sha256": sha(v),
             "clip_l14_similarity_score": 0.4} for k, v in good.items()]
    rows += [
        {"uid": "missing1", "url": f"{server.url}/nope1.jpg", "text": "x", "sha256": None, "clip_l14_similarity_score": 0.4},
        {"uid": "missing2", "url": f"{server.url}/nope2.jpg", "text": "x", "sha256": None, "clip_l14_similarity_score": 0.4},
        {"uid": "silent", "url": f"{silent.url}/a.jpg", "text": "x", "sha256": None, "clip_l14_similarity_score": 0.4},
        {"uid": "text", "url": f"{server.url}/text.jpg", "text": "x", "sha256": sha(text), "clip_l14_similarity_score": 0.4},
        {"uid": "trunc", "url": f"{server.url}/trunc.jpg", "text": "x", "sha256": sha(full),
         "clip_l14_similarity_score": 0.4},
        {"uid": "bomb", "url": f"{server.url}/bomb.png", "text": "x", "sha256": sha(bomb), "clip_l14_similarity_score": 0.4},
        {"uid": "lowscore", "url": f"{server.url}/g00.jpg", "text": "x", "sha256": sha(good["g00"]),
         "clip_l14_similarity_score": 0.1},
    ]
    meta = tmp_path_factory.mktemp("meta") / "part0.parquet"
    pq.write_table(pa.Table.from_pylist(rows), meta)
    yield meta, good, server
    server.close()
    silent.close()


def test_round_trip_keeps_every_good_sample_once(mixed_corpus, tmp_path):
    meta, good, _ = mixed_corpus
    s = download([meta], tmp_path / "shards", image_size=32, samples_per_shard=5, threads=4, timeout=2,
                 filters=["clip_l14_similarity_score>=0.3"])
    assert s["rows_in"] == 19 and s["rows_kept"] == 18
    samples, counts = read_shards(tmp_path / "shards")
    uids = sorted(json.loads(v["json"])["uid"] for v in samples.values())
    assert uids == sorted(good)
    assert max(counts.values()) == 1
    for v in samples.values():
        meta_row = json.loads(v["json"])
        assert v["txt"].decode() == f"caption {meta_row['uid']}"
        assert min(Image.open(io.BytesIO(v["jpg"])).size) == 32  # shorter side, ratio kept
    r = s["failures_by_reason"]
    assert r["http 404"] == 2
    assert r["timeout"] == 1
    assert r["not a decodable image"] == 1
    assert r["hash mismatch (truncated or altered file)"] == 1
    assert r["image too large (decompression-bomb limit)"] == 1
    assert s["successes"] == 12 and s["count"] == 18 and s["images_per_second"] > 0
    assert json.loads((tmp_path / "shards" / "_pipeline" / "summary.json").read_text())["successes"] == 12


def test_bad_filter_and_paths(mixed_corpus, tmp_path):
    meta, _, _ = mixed_corpus
    with pytest.raises(DataError, match="no column 'clip_score'.*clip_l14_similarity_score"):
        download([meta], tmp_path / "o", filters=["clip_score>=0.3"])
    with pytest.raises(DataError, match="does not exist"):
        download([tmp_path / "nothing.parquet"], tmp_path / "o")


def _slow_corpus(tmp_path, seed: int, delay: float):
    """24 images served slowly from loopback, their metadata in tmp_path/m.parquet: (images by uid, server)."""
    good = {f"k{i:03d}": jpeg_bytes(seed + i, size=(40, 40)) for i in range(24)}
    server = RoutesServer({f"/{k}.jpg": v for k, v in good.items()}, delay=delay)
    rows = [{"uid": k, "url": f"{server.url}/{k}.jpg", "text": k, "sha256": sha(v)} for k, v in good.items()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    return good, server


def _kill_mid_way(proc, out, timeout: float) -> None:
    """kill -9 the download's whole process group once 2 of its 6 shards are finished."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 2:
        assert proc.poll() is None, "the download ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(out.glob("*_stats.json"))) < 6, "the kill should land mid-way"


def _complete_once(out, good) -> None:
    samples, counts = read_shards(out)
    assert sorted(json.loads(v["json"])["uid"] for v in samples.values()) == sorted(good)
    assert max(counts.values()) == 1


def test_resume_after_kill_has_no_duplicates(tmp_path):
    good, server = _slow_corpus(tmp_path, 100, delay=0.15)
    try:
        out = tmp_path / "shards"
        code = ("import sys; from crate_alpha.data.download import download; "
                f"download([{str(tmp_path / 'm.parquet')!r}], {str(out)!r}, image_size=32, samples_per_shard=4, "
                "threads=1, timeout=5)")
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_mid_way(proc, out, timeout=60)
        s = download([tmp_path / "m.parquet"], out, image_size=32, samples_per_shard=4, threads=4, timeout=5)
        _complete_once(out, good)
        assert s["successes"] == 24
    finally:
        server.close()


# ---- Spark (img2dataset's pyspark distributor, local mode) and fsspec URLs ----------------

def _sample_set(folder):
    samples, counts = read_shards(folder)
    return {(sha(v["jpg"]), v["txt"].decode()) for v in samples.values()}, counts


def test_spark_round_trip_matches_multiprocessing(mixed_corpus, tmp_path):
    # the same loopback corpus through both distributors; Spark in local[2], writing to a file:// URL
    meta, good, _ = mixed_corpus
    common = dict(image_size=32, samples_per_shard=5, threads=4, timeout=2, filters=["clip_l14_similarity_score>=0.3"])
    mp = download([meta], tmp_path / "mp", **common)
    sp = download([meta], f"file://{tmp_path / 'sp'}", processes=2, distributor="pyspark", subjob_size=2, **common)
    (mp_set, mp_counts), (sp_set, sp_counts) = _sample_set(tmp_path / "mp"), _sample_set(tmp_path / "sp")
    assert sp_set == mp_set and len(sp_set) == len(good)
    assert max(mp_counts.values()) == 1 and max(sp_counts.values()) == 1
    assert sp["failures_by_reason"] == mp["failures_by_reason"]
    assert (sp["shards"], sp["count"], sp["successes"], sp["distributor"]) == (mp["shards"], mp["count"], 12,
                                                                               "pyspark")
    # the manifest and summary are in the URL folder; verify reads it by URL
    assert (tmp_path / "sp" / "_pipeline" / "settings.json").exists()
    assert json.loads((tmp_path / "sp" / "_pipeline" / "summary.json").read_text())["successes"] == 12
    reports = verify_mod.verify_folder(f"file://{tmp_path / 'sp'}")
    assert verify_mod.train_num_samples(reports) == 12 and all(r.ok for r in reports)


def test_spark_download_killed_then_rerun_is_complete(tmp_path):
    good, server = _slow_corpus(tmp_path, 300, delay=0.25)
    try:
        out = tmp_path / "shards"
        args = [sys.executable, "-m", "crate_alpha.cli", "data", "download", str(tmp_path / "m.parquet"),
                "--out", str(out), "--image-size", "32", "--samples-per-shard", "4", "--threads", "1",
                "--processes", "2", "--distributor", "pyspark", "--subjob-size", "2"]
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_mid_way(proc, out, timeout=180)  # the process group: the driver, its JVM and the Python workers
        r = subprocess.run(args, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        _complete_once(out, good)
        # the settings manifest binds Spark runs as well: checked before Spark starts
        with pytest.raises(DataError, match="image_size: first run 32, now 48"):
            download([tmp_path / "m.parquet"], out, image_size=48, samples_per_shard=4, distributor="pyspark")
    finally:
        server.close()


def test_url_folders_keep_the_ownership_rules(tmp_path):
    # a non-local fsspec filesystem (memory://): the marker, the refusal and verify behave as on disk
    import fsspec

    from crate_alpha.data import storage
    from crate_alpha.data.ownership import MARKER, check_may_write, claim, clear_owned

    fs = fsspec.filesystem("memory")
    fs.pipe("/theirs/file.txt", b"keep")
    with pytest.raises(DataError, match="not written by crate-alpha"):
        check_may_write("memory://theirs", "shards")
    claim("memory://ours", "shards")
    assert fs.exists(f"/ours/{MARKER}")
    storage.write_json({"a": 1}, "memory://ours/_pipeline/x.json")
    assert storage.read_json("memory://ours/_pipeline/x.json") == {"a": 1} and not fs.glob("/ours/_pipeline/*tmp*")
    buf = io.BytesIO()
    write_tar(tmp_path / "00000.tar", [(f"a{i}", {"jpg": jpeg_bytes(i), "txt": b"c"}) for i in range(3)])
    buf.write((tmp_path / "00000.tar").read_bytes())
    fs.pipe("/ours/00000.tar", buf.getvalue())
    (rep,) = verify_mod.verify_folder("memory://ours")
    assert rep.samples == 3 and rep.ok
    clear_owned("memory://ours", "shards")
    assert not fs.exists("/ours") and fs.exists("/theirs/file.txt")
    with pytest.raises(DataError, match=r"cannot open nosuch://x.*fsspec back-end for nosuch://"):
        download(["m.parquet"], "nosuch://x")


def test_spark_without_java_is_one_line(tmp_path, monkeypatch):
    from crate_alpha.data.download import check_java

    assert "version" in check_java()  # Java 17 is on these machines
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"needs Java 17 or newer \(JAVA_HOME=.* has no bin/java\)") as e:
        check_java()
    assert "\n" not in str(e.value)
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="no java on PATH"):
        check_java()


@pytest.fixture
def damaged_shards(tmp_path):
    good = lambda i: {"jpg": jpeg_bytes(i), "txt": f"caption {i}".encode()}  # noqa: E731
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "00000.tar", [(f"a{i}", good(i)) for i in range(4)])
    write_tar(d / "00001.tar", [("b0", good(10)), ("b1", {"jpg": b"\xff\xd8garbage", "txt": b"x"}),
                                ("b2", {"jpg": jpeg_bytes(11)}), ("b3", good(12))])
    write_tar(d / "00002.tar", [(f"c{i}", good(20 + i)) for i in range(4)])
    data = (d / "00002.tar").read_bytes()
    (d / "00002.tar").write_bytes(data[: len(data) // 2 + 100])
    return d


def test_verify_names_damage(damaged_shards):
    reports = {r.shard: r for r in verify_mod.verify_folder(damaged_shards)}
    assert reports["00000.tar"].ok and reports["00000.tar"].samples == 4
    b = "\n".join(reports["00001.tar"].problems)
    assert "b1: image does not decode" in b and "b2: sample without caption" in b
    assert any("truncated or unreadable tar" in p for p in reports["00002.tar"].problems)
    r = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(damaged_shards)],
                       capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 1
    assert "00001.tar: b1: image does not decode" in r.stdout and "00001.tar: b2: sample without caption" in r.stdout
    assert "00002.tar: (tar): truncated" in r.stdout and "--train-num-samples" in r.stdout


def test_loader_skips_and_counts_damage(damaged_shards):
    counter = SkipCounter()
    tf = train_transform(16, (0.5,) * 3, (0.5,) * 3)
    urls = [str(p) for p in sorted(damaged_shards.glob("*.tar"))]
    images, texts = [], []
    for batch in shard_loader(urls, tf, batch_size=3, counter=counter):
        images.append(batch[0])
        texts += batch[1]
    good_a = [f"caption {i}" for i in range(4)]
    assert texts[:4] == good_a and "caption 10" in texts and "caption 12" in texts
    assert "x" not in texts  # the undecodable image's sample
    assert counter.count >= 3  # bad image, missing caption, truncated tar
    assert images[0].shape[1:] == (3, 16, 16)


def _smooth_jpeg(w=340, h=256, quality=95, mode="RGB"):
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    arr = np.stack([np.sin(6 * y) * np.cos(5 * x), x * y, np.cos(3 * y) * np.sin(4 * x)], -1) * 127 + 128
    buf = io.BytesIO()
    img = Image.fromarray(arr.astype(np.uint8))
    img.convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_fast_decode_matches_plain_crop():
    import torchvision.transforms.functional as TF

    from crate_alpha.data.decode import _reduction, image_size

    data = _smooth_jpeg()
    assert image_size(data) == (340, 256)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for box in [(0, 0, 256, 340), (10, 40, 200, 180), (30, 20, 120, 100)]:
        fast = np.asarray(decode_crop(data, 84, box, draft=True), float)
        plain = np.asarray(TF.resized_crop(full, *box, [84, 84], interpolation=TF.InterpolationMode.BICUBIC), float)
        assert fast.shape == (84, 84, 3)
        assert np.abs(fast - plain).mean() < 2.0, box
    # the large crops are really decoded at 1/2 scale, the small one at full size
    assert _reduction(256, 84) == 2 and _reduction(180, 84) == 2 and _reduction(100, 84) == 1
    assert _reduction(500, 84) == 4 and _reduction(700, 84) == 8 and _reduction(5000, 84) == 8


def test_fast_decode_other_inputs():
    # grayscale JPEG -> 3 channels; PNG (no JPEG header) decoded whole; garbage -> a clear error
    gray = decode_crop(_smooth_jpeg(mode="L"), 32)
    assert gray.shape == (32, 32, 3) and np.allclose(gray[..., 0], gray[..., 1], atol=1)
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 10, 30)).save(buf, "PNG")
    red = decode_crop(buf.getvalue(), 16)
    assert red.shape == (16, 16, 3) and tuple(red[8, 8]) == (200, 10, 30)  # RGB order, not OpenCV's BGR
    with pytest.raises(ValueError, match="does not decode"):
        decode_crop(b"\xff\xd8 not really a jpeg", 16)


def test_jpeg_decode_equals_opencv_at_every_scale():
    # simplejpeg (TurboJPEG) gives OpenCV's libjpeg-turbo pixels, at the same reduced sizes
    import cv2

    from crate_alpha.data.decode import _REDUCED, _decode, image_size

    for data in (_smooth_jpeg(), _smooth_jpeg(331, 257, quality=80), _smooth_jpeg(mode="L")):
        for reduce in (1, 2, 4, 8):
            ours = _decode(data, reduce, image_size(data))
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce])
            assert ours.shape == bgr.shape and np.array_equal(ours, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    # CMYK comes out as RGB; a truncated file decodes as far as it goes (as OpenCV's would); a
    # header with no scan, which TurboJPEG refuses, goes on to OpenCV and fails with our error
    box = (0, 0, 256, 340)
    rgb = decode_crop(_smooth_jpeg(), 32, box).astype(float)
    assert np.abs(decode_crop(_smooth_jpeg(mode="CMYK"), 32, box) - rgb).mean() < 8
    data = _smooth_jpeg()
    assert decode_crop(data[:len(data) // 2], 32, box).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="does not decode"):
        decode_crop(data[:data.index(b"\xff\xda")], 32)


def test_crop_parameters_follow_torchvision():
    import random

    from crate_alpha.data.decode import sample_crop

    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = sample_crop(300, 200, (0.4, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 0.4 * 60000 * 0.97 <= h * w <= 60000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # no crop of that area fits a very wide image: torchvision's fallback, a centred crop at the max ratio
    assert sample_crop(1000, 10, (0.99, 1.0), (1.0, 1.0), rng) == (0, 495, 10, 10)


def test_normalised_tensor_equals_torchvision():
    from torchvision import transforms

    from crate_alpha.data.decode import ToNormalizedTensor

    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    ref = transforms.Normalize(mean, std)(transforms.ToTensor()(rgb))
    out = ToNormalizedTensor(mean, std)(rgb)
    assert out.is_contiguous() and out.shape == (3, 20, 24)
    assert torch.allclose(out, ref, atol=1e-5)


def test_cached_tokenizer_gives_open_clips_ids():
    import random
    import string

    import open_clip

    from crate_alpha.data.tokenize import CachedTokenizer, fast_tokenizer

    rng = random.Random(0)
    alphabet = string.printable + "\u00e9\u00fc\u2014\u201c\u2019&amp;&lt;\U0001f600\ufb01\x1b\x00\u2028"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(400)]
    texts += ["  Hello   WORLD &amp; co ", "don't stop", "\tTab\nline", "caf\u00e9", "\u00e2\u20ac\u2122 mojibake",
              " ".join(["word"] * 120)]  # the last one is cut at the context length
    for name in ("crate-alpha-demo", "crate-alpha-L-14"):
        ref = open_clip.get_tokenizer(name)
        if not CachedTokenizer.supports(ref):
            continue
        fast = fast_tokenizer(ref)
        assert isinstance(fast, CachedTokenizer)
        for text in texts + texts:  # the second pass reads the word cache
            assert torch.equal(fast(text), ref(text)), repr(text)
        assert torch.equal(fast(texts[:7], context_length=12), ref(texts[:7], context_length=12))
        assert fast.vocab_size == ref.vocab_size


def test_open_clip_train_loader_throughput(tmp_path):
    # the loader open_clip_train trains from (its get_data as a CLIP run serves it), one worker:
    # every sample arrives, in shared memory, normalised like open_clip's own path
    from crate_alpha.apps.bench_data import _demo_shards, _replicate, loader_throughput, train_loader

    urls = _replicate(_demo_shards(tmp_path, 40, 64)[0], 2)
    means = []
    for reduced in (False, True):
        batches = list(train_loader(urls, 32, reduced, batch=16, workers=1))
        assert sum(len(b[0]) for b in batches) == 80
        images, texts = batches[0]
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and texts.shape[0] == 16
        means.append(torch.cat([b[0] for b in batches]).mean().item())
        assert loader_throughput(urls, 32, reduced, batch=16, passes=1) > 0
    assert abs(means[0] - means[1]) < 0.05
    # the worker sends uint8 images, collated straight into shared memory; normalised after the loader
    raw = train_loader(urls, 32, True, batch=16, workers=1)._batches
    images, _ = next(iter(raw))
    assert images.dtype == torch.uint8 and images.is_shared()


def test_batch_normalize_equals_per_image():
    from crate_alpha.data.decode import BatchNormalize, ToNormalizedTensor, ToUint8Tensor
    from crate_alpha.data.loader import NormalizedLoader

    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    rgbs = [np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(3)]
    batch = torch.stack([ToUint8Tensor()(r) for r in rgbs])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 20, 24)
    out = BatchNormalize(mean, std)(batch)
    assert torch.equal(out, torch.stack([ToNormalizedTensor(mean, std)(r) for r in rgbs]))
    floats = torch.zeros(2, 3, 4, 4)
    (a, ta), (b, _) = NormalizedLoader([(batch, "t"), (floats, "u")], BatchNormalize(mean, std))
    assert torch.equal(a, out) and ta == "t" and b is floats


def test_batch_normalize_copies_its_constants_to_a_device_once():
    # a copy per batch to a GPU is a blocking one: the loader would wait for every queued step
    from crate_alpha.data.decode import BatchNormalize

    norm = BatchNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    first = norm(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta"))
    assert first.device.type == "meta" and first.dtype == torch.float32
    constants = norm._on[torch.device("meta")]
    norm(torch.zeros(5, 3, 4, 4, dtype=torch.uint8, device="meta"))
    assert norm._on[torch.device("meta")] is constants


def _expanded(expander, path):
    with open(path, "rb") as f:
        return [(s["fname"], s["data"], s["__url__"]) for s in expander([{"url": str(path), "stream": f}])]


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_tarstream_reads_what_webdataset_reads(tmp_path, fmt):
    import gzip
    import tarfile

    from webdataset import tariterators

    from crate_alpha.data.tarstream import tar_file_expander

    fmt = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    members = [("a/" * 60 + "s0.jpg", jpeg_bytes(0)), ("s0.txt", b"caption"), ("s0.json", b"{}"),
               ("k\u00e9y.txt", b"x"), ("__key__", b"meta"), ("d", None), ("empty.txt", b""), ("big.bin", bytes(5000))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            if fmt == tarfile.USTAR_FORMAT and (len(name) > 100 or not name.isascii()):
                continue
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    for name, data in (("x.tar", raw), ("x.tar.gz", gzip.compress(raw))):  # the compressed one goes to tarfile
        (tmp_path / name).write_bytes(data)
        ours = _expanded(tar_file_expander, tmp_path / name)
        assert ours == _expanded(tariterators.tar_file_expander, tmp_path / name)
        assert "__key__" not in [m[0] for m in ours] and ("s0.txt", b"caption", str(tmp_path / name)) in ours
    # damage: a cut-short shard or a corrupted header raises (the loader's handler counts it) after the
    # members before the damage
    (tmp_path / "cut.tar").write_bytes(raw[:2048 + 700])
    with pytest.raises(tarfile.ReadError):
        _expanded(tar_file_expander, tmp_path / "cut.tar")
    second = raw.index(b"{}\0") - 512 if fmt == tarfile.USTAR_FORMAT else None
    if second is not None:  # a damaged header after good members: checksum error, not garbage members
        bad = bytearray(raw)
        bad[second + 3] ^= 0xFF
        (tmp_path / "bad.tar").write_bytes(bytes(bad))
        with pytest.raises(tarfile.ReadError, match="checksum"):
            _expanded(tar_file_expander, tmp_path / "bad.tar")
    counted = []
    got = [s for s in tar_file_expander([{"url": "u", "stream": io.BytesIO(bytes(raw[:1024]) + bytes(100))}],
                                        handler=lambda e: counted.append(e) or True)]
    assert len(counted) == 1 and len(got) <= 1


def test_cli_errors_name_the_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_pipeline", "verify", str(tmp_path / "none")],
                       capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr and "Traceback" not in r.stderr


def test_input_stage_profile(tmp_path):
    from crate_alpha.apps.bench_data import plot_profile, profile_stages

    prof = profile_stages(32, 64, samples=16, batch=8)
    stages = prof["seconds_per_sample"]
    assert set(stages) == {"tar read", "tar read (tarstream)", "JPEG decode (full, PIL)",
                           "random resized crop (torchvision)",
                           "JPEG decode + crop (reduced-size)", "to-tensor + normalise",
                           "to-tensor + normalise (one pass)", "caption tokenisation",
                           "caption tokenisation (cached)", "collation"}
    assert all(v > 0 for v in stages.values())
    png = plot_profile([prof], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_wait_share_from_open_clip_train_log(tmp_path):
    from crate_alpha.visualize import open_clip_data_wait

    log = tmp_path / "out.log"
    fmt = "2026-11-24,19:07:26 | INFO | Train Epoch: {} [{:>4}/1472 ({}%)] Data (t): {} Batch (t): {}, 1/s LR: 0.1"
    log.write_text("\n".join([fmt.format(0, 64, 4, "0.200", "0.500"), fmt.format(0, 1472, 100, "0.000", "0.100"),
                              "INFO | Start epoch 1", fmt.format(1, 64, 4, "0.200", "0.500"),
                              fmt.format(1, 1472, 100, "0.000", "0.100")]))
    # per epoch: one step waits 0.2 of 0.5 s, 22 steps wait nothing of 0.1 s each
    assert abs(open_clip_data_wait(log) - 0.4 / (1.0 + 4.4)) < 1e-9
