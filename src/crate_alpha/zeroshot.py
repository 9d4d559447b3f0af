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

import crate_alpha  # noqa: F401  (registers CRATE-α in timm and open_clip)

from .common import CrateAlphaError, local_dir
from .convert.folders import TOKENIZER_FILES


class EvalError(CrateAlphaError):
    pass


def _check_model(model: str, checkpoint: Optional[str]) -> None:
    import open_clip

    folder = local_dir(model)
    if folder is not None:
        if not (folder / "open_clip_config.json").is_file():
            raise EvalError(f"{folder} is not an open_clip model folder (no open_clip_config.json)")
        text_cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {}).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name") and not any((folder / f).is_file() for f in TOKENIZER_FILES[1:3]):
            raise EvalError(f"{folder} has no tokenizer files ({text_cfg['hf_tokenizer_name']}); convert it again "
                            "with `crate-alpha convert ... --tokenizer DIR`, or online so the Hub provides them")
    elif model not in open_clip.list_models():
        names = ", ".join(n for n in open_clip.list_models() if "crate" in n)
        raise EvalError(f"unknown model {model!r}; CRATE-α models: {names}")
    if checkpoint and not os.path.isfile(checkpoint):
        raise EvalError(f"checkpoint {checkpoint} does not exist")


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
    the prompts.
    """
    val = Path(val_dir).resolve()
    if not val.is_dir():
        raise EvalError(f"ImageNet validation folder {val} does not exist")
    wnids = sorted(p.name for p in val.iterdir() if p.is_dir())
    if len(wnids) != 1000:
        raise EvalError(f"{val} has {len(wnids)} class folders; ImageNet-1K validation needs 1000 (one per WordNet id)")
    root = Path(cache)
    root.mkdir(parents=True, exist_ok=True)
    link = root / "val"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(val, target_is_directory=True)
    torch.save(({w: (w,) for w in wnids}, None), root / "meta.bin")
    return str(root)


def results_table(files: List[str], out_prefix: str) -> str:
    rows = []
    for f in files:
        r = json.loads(Path(f).read_text())
        m = r.get("metrics", {})
        rows.append({
            "file": str(f), "model": r.get("model"), "pretrained": r.get("pretrained"), "dataset": r.get("dataset"),
            "task": r.get("task"),
            "acc1": m.get("acc1"), "acc5": m.get("acc5"), "mean_per_class_recall": m.get("mean_per_class_recall"),
            "image_retrieval_recall@5": m.get("image_retrieval_recall@5"),
            "text_retrieval_recall@5": m.get("text_retrieval_recall@5"),
        })
    cols = [c for c in rows[0] if any(r[c] is not None for r in rows)] if rows else []
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{100 * v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    out.with_suffix(".md").write_text(text)
    return text
