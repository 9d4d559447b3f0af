"""The released weights through huggingface_hub: Hub references, converted once into its cache.

timm loads the released classifiers itself (``timm.create_model(name.tag, pretrained=True)``,
see ``crate_alpha.models.crate_alpha``). open_clip cannot: its ``hf-hub:`` tags address no file in
a sub-folder of a repo, and the files are in the official layout. So a released CLIPA
model (or any official-layout file) is downloaded by huggingface_hub (its cache,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and progress bars), converted once into
a folder beside the Hub cache, keyed by the file's commit, and named as ``local-dir:``.

A Hub reference is a released name (``crate_alpha_base_patch16_224.in21k_ft_in1k``,
``crate-alpha-CLIPA-L-14``; see ``crate_alpha.models.released``) or a file,
``hf://OWNER/REPO[@REVISION]/PATH``. The CLI takes one wherever it takes a model
(:func:`resolve_model`) or a weight file (:func:`resolve_file`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional

from ..models import released
from ..common import LOCAL_DIR
from ..errors import HubError

HF_PREFIX = "hf://"


class HubFile(NamedTuple):
    repo: str
    path: str
    revision: Optional[str] = None


def parse_reference(spec) -> Optional[HubFile]:
    """The Hub file a reference names, or None when ``spec`` is not a Hub reference."""
    if not isinstance(spec, str):
        return None
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise HubError(f"{spec!r} is not a Hub file reference; write hf://OWNER/REPO[@REVISION]/PATH, "
                           f"e.g. hf://{released.REPO}/{released.RELEASES[0].path}")
        name, _, revision = parts[1].partition("@")
        return HubFile(f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None)
    r = released.by_name(spec)
    return HubFile(released.REPO, r.path) if r is not None else None


def download(ref: HubFile) -> Path:
    """The file in the local Hub cache, downloaded when missing (huggingface_hub's progress bar)."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo, ref.path, revision=ref.revision))
    except Exception as e:  # huggingface_hub's errors (offline, 404, auth) and the network's
        name = type(e).__name__
        if name == "LocalEntryNotFoundError" or constants.HF_HUB_OFFLINE:
            why = (f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, "
                   "or the Hub cannot be reached: run once online to fill the cache")
        elif name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            why = "the repo has no such file"
        elif name in ("RepositoryNotFoundError", "GatedRepoError"):
            why = "no such repo, or it needs a token (HF_TOKEN)"
        elif name == "RevisionNotFoundError":
            why = f"no revision {ref.revision!r}"
        else:
            first = (str(e).strip().splitlines() or [name])[0]
            why = f"{name}: {first}"
        raise HubError(f"cannot get {ref.path} from the Hub repo {ref.repo}: {why}") from None


def resolve_file(spec):
    """A local path for ``spec``: a Hub reference (``hf://…``, or a released name that is not
    a local path) is downloaded; anything else is returned as it is."""
    if not isinstance(spec, str) or (not spec.startswith(HF_PREFIX) and os.path.exists(spec)):
        return spec
    ref = parse_reference(spec)
    return str(download(ref)) if ref is not None else spec


def released_model(spec) -> Optional[str]:
    """The model name whose head counts a released file needs (for ``convert``), else None."""
    ref = parse_reference(spec) if isinstance(spec, str) and not os.path.exists(spec) else None
    r = released.by_path(ref.path) if ref is not None and ref.repo == released.REPO else None
    return (r.open_clip or r.model) if r is not None else None


def _commit_of(local: Path, ref: HubFile) -> str:
    # hf_hub_download answers .../snapshots/<commit>/<path>; the commit keys the conversion
    parts = local.parts
    depth = len(Path(ref.path).parts)
    if len(parts) > depth + 1 and parts[-depth - 2] == "snapshots":
        return parts[-depth - 1]
    return "unversioned"


def converted_dir(ref: HubFile, tokenizer=None) -> Path:
    """A timm or open_clip model folder of the Hub file ``ref``, converted once and kept.

    It lives beside huggingface_hub's cache (``HF_HUB_CACHE/../crate-alpha/``), per repo,
    commit and path, so a second call (offline too) finds it.
    """
    from huggingface_hub import constants

    from .big_vision import convert_big_vision
    from .official_torch import convert_official_torch
    from .targets import named_heads

    local = download(ref)
    out = (Path(constants.HF_HUB_CACHE).parent / "crate-alpha" / ref.repo.replace("/", "--")
           / _commit_of(local, ref) / ref.path)
    if (out / "config.json").is_file() or (out / "open_clip_config.json").is_file():
        return out
    r = released.by_path(ref.path) if ref.repo == released.REPO else None
    print(f"crate-alpha: converting {ref.repo}/{ref.path} once into {out}", flush=True)
    if ref.path.endswith(".npz"):
        convert_big_vision(str(local), out, tokenizer=tokenizer)
    else:
        # the release names the file's model: its head counts, the shape read from the file itself
        heads, text_heads = named_heads(r.open_clip or r.model) if r is not None else (None, None)
        convert_official_torch(local, out, heads=heads, text_heads=text_heads, tokenizer=tokenizer)
    return out


def resolve_model(spec):
    """``local-dir:FOLDER`` for a Hub reference (converted once); anything else as it is."""
    ref = parse_reference(spec)
    return f"{LOCAL_DIR}{converted_dir(ref)}" if ref is not None else spec


def pretrained_dir(name: str, revision: Optional[str] = None, tokenizer: Optional[os.PathLike] = None) -> str:
    """``local-dir:FOLDER`` of a released model, for open_clip (CLIPA) or timm (classifiers).

    ``name``: ``crate-alpha-CLIPA-L-14``, ``crate-alpha-CLIPA-H-14`` or any released timm
    name with its tag. ``tokenizer``: a folder of bert-base-uncased tokenizer files, when
    neither the Hub nor its cache can give them. Usage::

        model, _, preprocess = open_clip.create_model_and_transforms(crate_alpha.pretrained_dir("crate-alpha-CLIPA-L-14"))
        tokenizer = open_clip.get_tokenizer(crate_alpha.pretrained_dir("crate-alpha-CLIPA-L-14"))
    """
    r = released.by_name(name)
    if r is None:
        names = ", ".join(sorted({x.open_clip for x in released.RELEASES if x.open_clip}
                                 | {x.name for x in released.RELEASES}))
        raise HubError(f"{name!r} is no released CRATE-α model; released: {names}")
    return f"{LOCAL_DIR}{converted_dir(HubFile(released.REPO, r.path, revision), tokenizer=tokenizer)}"
