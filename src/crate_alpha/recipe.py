"""Training recipes: one readable Python file per experiment, in big_vision's style.

A recipe file defines ``get_config(arg=None)`` returning a dict of keys (any key left out
keeps the trainer's default). ``arg`` selects a variant of the experiment, written after a
colon: ``clipa_crate_alpha_L14_84_pretrain.py:demo`` is the paper's pre-training shrunk to
the digits demo, derived from the paper recipe rather than copied. A recipe is named by
its path, or by the name of one shipped with the package (``configs/`` is installed as
``crate_alpha.configs``). Every key can be overridden on the command line as ``key=value``.

Keys use the library's own names: open_clip_train's flags for the CLIP trainer
(``wd``, ``grad_clip_norm``, ``save_frequency``, ``logs``, ...), timm's ``train.py``
arguments for the classifier (``clip_grad``, ``smoothing``, ``aa``, ``output``, ...).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import RecipeError


def shipped_recipes_dir() -> Path:
    spec = importlib.util.find_spec("crate_alpha.configs")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the recipes shipped with crate-alpha (crate_alpha.configs) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def list_recipes() -> List[str]:
    return sorted(p.stem for p in shipped_recipes_dir().glob("*.py") if not p.name.startswith("_"))


def resolve(spec: str) -> Tuple[Path, Optional[str]]:
    """(recipe file, variant) of ``PATH[:VARIANT]`` or ``NAME[:VARIANT]``."""
    text, arg = str(spec), None
    if ":" in Path(text).name:
        text, arg = text.rsplit(":", 1)
    path = Path(text)
    if path.is_file():
        return path, arg or None
    name = path.name[:-3] if path.name.endswith(".py") else path.name
    shipped = shipped_recipes_dir() / f"{name}.py"
    if shipped.is_file() and path.parent in (Path("."), Path("configs")):
        return shipped, arg or None
    raise RecipeError(f"recipe {spec!r} is neither a file nor a shipped recipe; shipped: {', '.join(list_recipes())}")


def _read(path: Path, arg: Optional[str]) -> Dict[str, Any]:
    # A recipe is Python and runs here, as big_vision's do: its own failures are named with
    # the recipe and its line, and a recipe that exits would otherwise end the run silently.
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        get_config = getattr(mod, "get_config", None)
        if get_config is None:
            raise RecipeError(f"recipe {path} defines no get_config()")
        if not inspect.signature(get_config).parameters:
            if arg:
                raise RecipeError(f"recipe {path} has no variants (its get_config() takes no argument), got :{arg}")
            values = get_config()
        else:
            try:
                values = get_config(arg)
            except ValueError as e:  # the recipe's own word on an unknown variant
                raise RecipeError(f"recipe {path}: {e}") from None
    except RecipeError:
        raise
    except SystemExit as e:
        raise RecipeError(f"recipe {path} called sys.exit({e.code!r}) while loading; a recipe only returns its "
                          "dict from get_config()") from None
    except Exception as e:  # noqa: BLE001 - the recipe's own error, named with its line
        raise RecipeError(f"recipe {path} failed while loading{_line_in(e, path)}: {type(e).__name__}: {e}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"recipe {path} get_config() returned a {type(values).__name__}, not a dict of keys")
    return dict(values)


def _line_in(error: BaseException, path: Path) -> str:
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
    if isinstance(error, SyntaxError) and error.lineno:
        lines.append(error.lineno)
    return f" (line {lines[-1]})" if lines else ""


def check_keys(keys: Iterable[str], where: str, defaults: Dict[str, Any], renamed: Dict[str, str]) -> None:
    for k in keys:
        if k in renamed:
            raise RecipeError(f"recipe key {k!r} in {where} is now called {renamed[k]!r} (the library's own name)")
    unknown = sorted(set(keys) - set(defaults))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)} in {where}; known keys: "
                          + ", ".join(sorted(defaults)))


def parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def load_recipe(spec: Optional[str], overrides: Iterable[str], defaults: Dict[str, Any], name_key: str,
                renamed: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The trainer's defaults, updated by the recipe (and variant), then by ``key=value`` overrides.

    The run's name (``name_key``) defaults to the recipe's file name, plus ``-VARIANT``.
    """
    renamed = renamed or {}
    cfg = dict(defaults)
    if spec:
        path, arg = resolve(spec)
        values = _read(path, arg)
        check_keys(values, f"{path}{':' + arg if arg else ''}", defaults, renamed)
        cfg.update(values)
        cfg[name_key] = cfg[name_key] or (f"{path.stem}-{arg}" if arg else path.stem)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        check_keys([key], "the command line", defaults, renamed)
        cfg[key] = parse_value(raw)
    cfg[name_key] = cfg[name_key] or "run"
    from .device import check_choice  # not at the top: importing this module stays free of torch

    check_choice(cfg.get("device"), cfg.get("fsdp", False))
    return cfg


# ---- value checks: a typo in a number fails before anything is built ----------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


POSITIVE_INT = ("a whole number >= 1", lambda v: _is_int(v) and v >= 1)
COUNT = ("a whole number >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = ("a finite number > 0", lambda v: _is_num(v) and v > 0)
NON_NEGATIVE = ("a finite number >= 0", lambda v: _is_num(v) and v >= 0)
FRACTION = ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1)
PROBABILITY = ("a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1)


def check_values(cfg: Dict[str, Any], rules: Dict[str, tuple], optional: Iterable[str] = ()) -> None:
    """Each key of ``rules`` is ``(what it must be, test)``; keys in ``optional`` may also be None."""
    optional = set(optional)
    for key, (what, ok) in rules.items():
        value = cfg.get(key)
        if value is None and key in optional:
            continue
        if not ok(value):
            none = " (or None)" if key in optional else ""
            raise RecipeError(f"{key} must be {what}{none}, got {value!r}")


def _plain(value):
    # a recipe value as its JSON record has it: tuples are lists there
    return json.loads(json.dumps(value, default=str))


def check_resume_compatible(saved: Dict[str, Any], cfg: Dict[str, Any], where, keys: Iterable[str]) -> None:
    """Changing ``keys`` between a run and its resumption would silently mix two experiments."""
    diff = [f"{k} {saved.get(k)!r} -> {cfg.get(k)!r}" for k in keys
            if k in cfg and k in saved and _plain(saved.get(k)) != _plain(cfg.get(k))]
    if diff:
        raise RecipeError(f"{where} holds a run of another recipe ({'; '.join(diff)}); resume it with the same "
                          "values, or start a new run (another name, or move that folder away)")
