"""Reliability of the download, zero-shot and segment-eval commands: bad input is named in one
line before anything is written, user files are never replaced, and the numbers reported
mean what they say. Each test here failed before its fix."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crate_alpha.data.download import DataError, download, summarize
from crate_alpha.data.ownership import MARKER
from data_helpers import RoutesServer, SilentServer, jpeg_bytes, read_shards, sha

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Six small images behind a loopback server, and metadata rows for them."""
    good = {f"k{i}": jpeg_bytes(500 + i, size=(40, 40)) for i in range(6)}
    server = RoutesServer({f"/{k}.jpg": v for k, v in good.items()})
    rows = [{"uid": k, "url": f"{server.url}/{k}.jpg", "text": f"caption {k}", "sha256": sha(v)}
            for k, v in good.items()]
    meta = tmp_path_factory.mktemp("meta") / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), meta)
    yield meta, good, rows
    server.close()


def _uids(folder):
    samples, _ = read_shards(folder)
    return sorted(json.loads(v["json"])["uid"] for v in samples.values())


# ---- 3: the zero-shot ImageNet cache follows the ownership rule ----------------------------

def _val(tmp_path):
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
    return val


def test_imagenet_cache_never_replaces_user_files(tmp_path):
    from crate_alpha.clip.zeroshot import imagenet_root
    from crate_alpha.errors import DataError

    val = _val(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "val").write_text("my notes")
    (user / "meta.bin").write_text("my meta")
    with pytest.raises(DataError, match=f"{user} is not empty and is not written by crate-alpha"):
        imagenet_root(str(val), str(user))
    assert (user / "val").read_text() == "my notes" and (user / "meta.bin").read_text() == "my meta"
    assert not (user / MARKER).exists()
    cache = tmp_path / "cache"
    for _ in range(2):  # created and marked, then reused
        imagenet_root(str(val), str(cache))
        assert (cache / "val").resolve() == val.resolve() and (cache / MARKER).is_file()
    (cache / "val").unlink()
    (cache / "val").mkdir()  # a real folder the user put into our cache is not ours to replace
    (cache / "val" / "x.txt").write_text("keep")
    with pytest.raises(DataError, match=f"{cache / 'val'} is not the link"):
        imagenet_root(str(val), str(cache))
    assert (cache / "val" / "x.txt").read_text() == "keep"


# ---- 4: sha256 verified per row, whatever the other metadata files hold --------------------

def test_hash_checked_in_every_file_with_mixed_schemas(served, tmp_path):
    _, good, rows = served
    wrong = dict(rows[0], sha256=sha(b"another file"), score=0.5)
    # a.parquet has hashes (one wrong) and a score column; b.parquet, sorted last, has neither
    pq.write_table(pa.Table.from_pylist([wrong] + [dict(r, score=0.5) for r in rows[1:3]]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("uid", "url", "text")} for r in rows[3:]]),
                   tmp_path / "b.parquet")
    out = tmp_path / "out"
    s = download([tmp_path], out, image_size=32, threads=2, timeout=5)
    assert s["failures_by_reason"] == {"hash mismatch (truncated or altered file)": 1}
    assert _uids(out) == sorted(good)[1:] and s["successes"] == 5
    samples, _ = read_shards(out)
    scores = {json.loads(v["json"])["uid"]: json.loads(v["json"]).get("score") for v in samples.values()}
    assert scores == {"k1": 0.5, "k2": 0.5, "k3": None, "k4": None, "k5": None}


# ---- 15: every setting checked up front, nothing recorded by a refused run -----------------

def test_bad_settings_are_refused_before_anything_is_written(served, tmp_path):
    meta = served[0]
    out = tmp_path / "out"
    cases = [(dict(image_size=-5), "image_size \\(--image-size\\) is -5"),
             (dict(samples_per_shard=0), "samples_per_shard \\(--samples-per-shard\\) is 0"),
             (dict(threads=0), "threads \\(--threads\\) is 0"),
             (dict(processes=0), "processes \\(--processes\\) is 0"),
             (dict(subjob_size=0, distributor="pyspark"), "subjob_size \\(--subjob-size\\) is 0"),
             (dict(retries=-1), "retries \\(--retries\\) is -1"),
             (dict(timeout=0), "timeout \\(--timeout\\) is 0"),
             (dict(encode_quality=101), "encode_quality is 101"),
             (dict(resize_mode="stretch"), "resize mode 'stretch'"),
             (dict(filters=["nosuch>=1"]), "no column 'nosuch'")]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            download([meta], out, **kwargs)
        assert not out.exists(), kwargs
    with pytest.raises(DataError, match="memory://x.*only in this process"):
        download([meta], "memory://x")
    s = download([meta], out, image_size=32, samples_per_shard=4, threads=2, timeout=5)  # not blocked
    assert s["successes"] == 6
    r = subprocess.run([sys.executable, "-m", "crate_alpha.cli", "data", "download", str(meta), "--out",
                        str(tmp_path / "cli"), "--samples-per-shard", "0"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_no_rows_left_records_nothing(served, tmp_path):
    meta = served[0]
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no metadata rows left"):
        download([meta], out, filters=["uid==nobody"])
    s = download([meta], out, image_size=32, threads=2, timeout=5, filters=["uid!=nobody"])  # not blocked
    assert s["successes"] == 6


# ---- 23: images/s of the time spent downloading; children die with a killed driver -------

def test_rate_counts_only_time_spent_downloading(tmp_path):
    def stats(i, start, end):
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({
            "count": 10, "successes": 10, "failed_to_download": 0, "failed_to_resize": 0,
            "start_time": start, "end_time": end, "status_dict": {"success": 10}}))

    stats(0, 100.0, 110.0)
    stats(1, 105.0, 115.0)  # overlaps shard 0 (two workers)
    stats(2, 5000.0, 5005.0)  # a resumed run, long after the first was killed
    s = summarize(tmp_path)
    assert s["wall_seconds"] == pytest.approx(20.0) and s["images_per_second"] == pytest.approx(1.5)


def _descendants(pid):
    """Every process below ``pid`` (children, theirs, ...), from /proc."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("distributor", ["multiprocessing", "pyspark"])
def test_children_die_with_a_killed_driver(tmp_path, distributor):
    silent = SilentServer()  # accepts and never answers: the download stays mid-way
    rows = [{"url": f"{silent.url}/{i}.jpg", "text": "x"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    code = ("from crate_alpha.data.download import download; "
            f"download([{str(tmp_path / 'm.parquet')!r}], {str(tmp_path / 'out')!r}, threads=1, timeout=600, "
            f"distributor={distributor!r}, subjob_size=1)")
    # its own session, so that what is left behind can be found and killed by the test
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    below = []
    try:
        deadline = time.time() + 300  # Spark's start on a loaded machine
        while len(silent.conns) < 1:  # a worker is fetching: the logger and the resource tracker are up
            assert time.time() < deadline and driver.poll() is None, "the download did not start"
            time.sleep(0.2)
        below = _descendants(driver.pid)
        assert len(below) >= 3, below  # resource tracker, img2dataset's logger, a pool worker or Spark's JVM
        driver.kill()  # kill -9 of the driver alone
        driver.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in below):
            time.sleep(0.2)
        left = [p for p in below if _alive(p)]
        assert not left, f"still running after the driver was killed: {left}"
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except OSError:
            pass
        driver.wait()
        silent.close()


def test_img2dataset_swaps_are_undone_also_when_the_download_fails():
    import importlib

    from crate_alpha.data import download as download_mod
    from crate_alpha.data.sample_checks import CheckedDownloader, checked_img2dataset

    main, distributor = importlib.import_module("img2dataset.main"), importlib.import_module("img2dataset.distributor")
    before = main.Downloader, main.Resizer, main.LoggerProcess, distributor.get_context
    with pytest.raises(RuntimeError, match="mid-download"):
        with checked_img2dataset(), download_mod._children_die_with_driver():
            assert main.Downloader is CheckedDownloader and main.LoggerProcess is not before[2]
            assert distributor.get_context is not before[3]
            raise RuntimeError("mid-download")
    assert (main.Downloader, main.Resizer, main.LoggerProcess, distributor.get_context) == before


# ---- 16, 22: segment-eval ------------------------------------------------------------------

TINY = "crate_alpha_custom.w32_d2_h2_patch8_32"


def _coco(tmp_path, anns, images=None):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
    path = tmp_path / "instances.json"
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return path


def test_coco_without_ground_truth_is_named(tmp_path):
    from crate_alpha.whitebox.segment_eval import coco_maskcut_ap
    from crate_alpha.whitebox.commands import WhiteboxError

    ann = _coco(tmp_path, [])
    with pytest.raises(WhiteboxError, match=f"{ann} has no ground-truth objects"):
        coco_maskcut_ap(TINY, tmp_path, ann, num_masks=1)
    crowd = {"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}
    with pytest.raises(WhiteboxError, match="no ground-truth objects"):  # crowd regions are ignored by COCOeval
        coco_maskcut_ap(TINY, tmp_path, _coco(tmp_path, [crowd]), num_masks=1)


def test_coco_damage_names_the_file_and_the_field(tmp_path):
    from crate_alpha.whitebox.segment_eval import coco_maskcut_ap
    from crate_alpha.whitebox.commands import WhiteboxError

    good = {"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0,
            "segmentation": [[0, 0, 5, 0, 5, 5]]}
    no_bbox = {k: v for k, v in good.items() if k != "bbox"}
    for anns, images, message in [
        ([no_bbox], None, "annotations\\[0\\] has no 'bbox'"),
        ([good, 7], None, "annotations\\[1\\] is not an object"),
        ([good], [{"id": 1, "width": 40, "height": 30}], "images\\[0\\] has no 'file_name'"),
        ({"a": 1}, None, "'annotations' is not a list"),
    ]:
        ann = _coco(tmp_path, anns, images)
        with pytest.raises(WhiteboxError, match=f"{ann}: {message}"):
            coco_maskcut_ap(TINY, tmp_path, ann, num_masks=1)
    ann.write_text('{"images": [')
    with pytest.raises(WhiteboxError, match=f"{ann} is not valid JSON"):
        coco_maskcut_ap(TINY, tmp_path, ann, num_masks=1)


def test_segment_eval_out_is_checked_first(tmp_path, monkeypatch):
    from crate_alpha.whitebox import interpret
    from crate_alpha.whitebox.segment_eval import segment_eval
    from crate_alpha.whitebox.commands import WhiteboxError

    def never(*a, **k):
        raise AssertionError("evaluated before the output place was checked")

    monkeypatch.setattr(interpret, "encoder", never)
    ann = _coco(tmp_path, [{"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0,
                            "segmentation": [[0, 0, 5, 0, 5, 5]]}])
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(WhiteboxError, match=f"--out {folder} is a folder") as e:
        segment_eval(TINY, folder, coco_images=tmp_path, coco_annotations=ann)
    assert ".partial" not in str(e.value)
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(WhiteboxError, match=f"{mine} exists and is not a segment-eval result"):
        segment_eval(TINY, mine, coco_images=tmp_path, coco_annotations=ann)
    assert mine.read_text() == '{"mine": true}'
    under_a_file = mine / "deeper" / "results.json"
    with pytest.raises(WhiteboxError, match=f"cannot write --out {under_a_file}: {mine} is a file, not a folder"):
        segment_eval(TINY, under_a_file, coco_images=tmp_path, coco_annotations=ann)
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # tests run as root, which ignores permission bits
    with pytest.raises(WhiteboxError, match=f"no permission to create entries in {tmp_path}"):
        segment_eval(TINY, tmp_path / "new" / "results.json", coco_images=tmp_path, coco_annotations=ann)


# ---- 22: zeroshot table --------------------------------------------------------------------

def _result(path, acc=0.5):
    path.write_text(json.dumps({"dataset": "cifar10", "model": "m", "pretrained": "p", "task": "zeroshot_classification",
                                "metrics": {"acc1": acc}}))
    return str(path)


def test_zeroshot_table_refuses_non_results_and_keeps_the_name(tmp_path):
    from crate_alpha.clip.zeroshot import EvalError, results_table

    good = _result(tmp_path / "r.json")
    for name, text in [("other.json", '{"hello": 1}'), ("list.json", "[1, 2]"), ("bad.json", "{")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(EvalError, match=f"{tmp_path / name} is not"):
            results_table([good, str(tmp_path / name)], str(tmp_path / "t"))
    assert not (tmp_path / "t.csv").exists()
    results_table([good], str(tmp_path / "x.v2"))
    assert (tmp_path / "x.v2.csv").is_file() and (tmp_path / "x.v2.md").is_file()
    assert not (tmp_path / "x.csv").exists()
    results_table([good], str(tmp_path / "y.csv"))  # a .csv or .md name stays the prefix it was
    assert (tmp_path / "y.csv").is_file() and (tmp_path / "y.md").is_file()
