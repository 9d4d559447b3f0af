"""Run clip_benchmark's own CLI in this process, after ``import crate_alpha`` registers our models.

clip_benchmark builds models by open_clip name; it cannot see the CRATE-α configs unless
they are registered in the same process, so its CLI is called here rather than as a
separate command. Results are clip_benchmark's JSON files, unchanged.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from ..common import atomic_write, check_open_clip_checkpoint, local_dir
from ..convert.folders import TOKENIZER_FILES
from ..data import ownership
from ..errors import CheckpointError, DataError, EvalError, ModelConfigError

IMAGENET_ROOT = "zero-shot ImageNet root"  # the kind recorded in the --cache folder's marker
TABLE_SUFFIXES = (".csv", ".md")  # an --out naming one of the tables is taken as the prefix without it
RESULT_KEYS = ("dataset", "model", "metrics")  # what every clip_benchmark result file holds


def _read_json(path: os.PathLike, what: str, error=EvalError):
    """The JSON in ``path``; a file that is not JSON is named in one line."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {what}") from None


def _check_model(model: str, checkpoint: Optional[str]) -> None:
    import open_clip

    folder = local_dir(model)
    if folder is not None:
        if not (folder / "open_clip_config.json").is_file():
            raise CheckpointError(f"{folder} is not an open_clip model folder (no open_clip_config.json)")
        cfg = _read_json(folder / "open_clip_config.json", "convert the model folder again", CheckpointError)
        text_cfg = cfg.get("model_cfg", {}).get("text_cfg", {}) if isinstance(cfg, dict) else {}
        if text_cfg.get("hf_tokenizer_name") and not any((folder / f).is_file() for f in TOKENIZER_FILES[1:3]):
            raise CheckpointError(f"{folder} has no tokenizer files ({text_cfg['hf_tokenizer_name']}); convert it "
                                  "again with `crate-alpha convert ... --tokenizer DIR`, or online so the Hub provides them")
    elif model not in open_clip.list_models():
        names = ", ".join(n for n in open_clip.list_models() if "crate" in n)
        raise ModelConfigError(f"unknown model {model!r}; CRATE-α models: {names}")
    if checkpoint and not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    if checkpoint:  # read and fitted before clip_benchmark, which would end in a traceback
        check_open_clip_checkpoint(model, checkpoint)


def clip_benchmark_eval(model: str, dataset: str, dataset_root: str, output: str, checkpoint: Optional[str] = None,
                        task: str = "auto", batch_size: int = 64, workers: int = 0,
                        extra: Optional[List[str]] = None, torchcompile: bool = False) -> dict:
    """Evaluate ``model`` (an open_clip name with a training checkpoint, or ``local-dir:``) on one dataset.

    ``torchcompile``: the image and text encoders run under torch.compile (clip_benchmark
    loads the model through a model type registered in ``patches``).
    """
    from clip_benchmark import cli

    from .patches import COMPILED_OPEN_CLIP, register_compiled_open_clip

    _check_model(model, checkpoint)
    if torchcompile:
        register_compiled_open_clip()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".partial.json")
    model_type = COMPILED_OPEN_CLIP if torchcompile else "open_clip"
    argv = ["clip_benchmark", "eval", "--model_type", model_type, "--model", model,
            "--pretrained", checkpoint or "", "--dataset", dataset, "--dataset_root", dataset_root,
            "--task", task, "--batch_size", str(batch_size), "--num_workers", str(workers),
            "--output", str(tmp), "--quiet"]
    if not torch.cuda.is_available():
        argv.append("--no_amp")
    argv += list(extra or [])
    saved = sys.argv
    sys.argv = argv
    try:
        cli.main()
    finally:
        sys.argv = saved
    if not tmp.is_file():
        raise EvalError(f"clip_benchmark wrote no result for {model} on {dataset}")
    os.replace(tmp, output)
    return json.loads(output.read_text())


def imagenet_root(val_dir: str, cache: str) -> str:
    """A clip_benchmark/torchvision ImageNet root around a plain ImageFolder validation folder.

    torchvision's ImageNet wants ``meta.bin`` beside ``val/``; it is written from the
    folder's class folders (WordNet ids), with clip_benchmark's own class names used for
    the prompts. ``cache`` follows the data pipeline's ownership rule: a new or empty folder
    is created and marked, a marked one is reused, and anything else is refused by name
    before a file is written. In our folder, ``val`` is replaced only when it is a link.
    """
    val = Path(val_dir).resolve()
    if not val.is_dir():
        raise DataError(f"ImageNet validation folder {val} does not exist")
    wnids = sorted(p.name for p in val.iterdir() if p.is_dir())
    if len(wnids) != 1000:
        raise DataError(f"{val} has {len(wnids)} class folders; ImageNet-1K validation needs 1000 (one per WordNet id)")
    root = Path(cache)
    link = root / "val"
    try:
        ownership.check_may_write(str(root), IMAGENET_ROOT)
    except DataError as e:
        raise DataError(f"--cache: {e}") from None
    if os.path.lexists(link) and not link.is_symlink():
        raise DataError(f"{link} is not the link to the validation folder this command made; nothing was changed. "
                        "Move it away, or give another --cache")
    ownership.claim(str(root), IMAGENET_ROOT)
    if not (link.is_symlink() and link.resolve() == val):
        # a new link under a temporary name, renamed over the old one: never a moment without one
        tmp = root / f".val.partial-{os.getpid()}"
        if os.path.lexists(tmp):
            tmp.unlink()
        tmp.symlink_to(val, target_is_directory=True)
        os.replace(tmp, link)
    atomic_write(root / "meta.bin", lambda tmp: torch.save(({w: (w,) for w in wnids}, None), tmp))
    return str(root)


def _result_row(f: str) -> dict:
    r = _read_json(f, "zeroshot table takes the result files of `crate-alpha zeroshot eval|imagenet`")
    if not isinstance(r, dict):
        problem = f"it holds a JSON {type(r).__name__}, not an object"
    elif [k for k in RESULT_KEYS if k not in r]:
        problem = "it has no " + ", ".join(repr(k) for k in RESULT_KEYS if k not in r)
    elif not isinstance(r["metrics"], dict):
        problem = "its 'metrics' is not an object"
    else:
        problem = None
    if problem:
        raise EvalError(f"{f} is not a clip_benchmark result file ({problem}); zeroshot table takes the --output "
                        "files of `crate-alpha zeroshot eval|imagenet`")
    m = r["metrics"]
    return {
        "file": str(f), "model": r.get("model"), "pretrained": r.get("pretrained"), "dataset": r.get("dataset"),
        "task": r.get("task"),
        "acc1": m.get("acc1"), "acc5": m.get("acc5"), "mean_per_class_recall": m.get("mean_per_class_recall"),
        "image_retrieval_recall@5": m.get("image_retrieval_recall@5"),
        "text_retrieval_recall@5": m.get("text_retrieval_recall@5"),
    }


def results_table(files: List[str], out_prefix: str) -> str:
    """``out_prefix``.csv and ``out_prefix``.md over clip_benchmark result files (all read before either is written)."""
    rows = [_result_row(f) for f in files]
    cols = [c for c in rows[0] if any(r[c] is not None for r in rows)] if rows else []
    out = Path(out_prefix)
    if out.suffix in TABLE_SUFFIXES:
        out = out.with_suffix("")
    # the suffixes are appended, never swapped in: --out x.v2 gives x.v2.csv, not x.csv
    csv_path, md_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".md")

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def fmt(v):
        return f"{100 * v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    atomic_write(csv_path, write_csv)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(text))
    return text
