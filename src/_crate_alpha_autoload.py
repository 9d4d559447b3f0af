"""Makes the CRATE-α models known to timm and open_clip in a process that never imports crate_alpha.

Neither library has a plug-in entry point: a model exists for them only once the module
that registers it has run. The installed ``crate_alpha_autoload.pth`` imports this module
at interpreter start-up; it puts one finder in front of ``sys.meta_path`` that lets
``timm`` and ``open_clip`` import as usual and, when the outermost of those imports has
finished, imports ``crate_alpha`` (which registers its timm entrypoints and open_clip
configs). So ``python -c "import open_clip; open_clip.create_model('crate-alpha-L-14')"``,
``clip_benchmark eval --model crate-alpha-…`` and ``python -m open_clip_train.main --model
crate-alpha-…`` work as they do for the libraries' own models.

What it must never do: import anything at start-up (it uses only ``sys`` and ``os``, which
the interpreter has already loaded), break an interpreter (a failing ``crate_alpha`` import
costs one warning line on stderr; timm or open_clip still import), or stay on when asked:
``CRATE_ALPHA_AUTOLOAD=0`` switches it off. It fires once and then leaves ``sys.meta_path``.
"""
import os
import sys

ENV = "CRATE_ALPHA_AUTOLOAD"
WATCHED = frozenset({"timm", "open_clip"})
OFF = frozenset({"0", "false", "no", "off"})


class _Loader:
    """The watched module's own loader, counting nested watched imports around its execution."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # the module sees its real loader (importlib.resources, pkgutil and reloads ask it)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._finder.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.depth -= 1
        # Only once the outermost watched import is complete: open_clip imports timm while
        # it is itself half-initialised, and crate_alpha needs both whole.
        if self._finder.depth == 0:
            self._finder.fire()


class Finder:
    """Wraps the loader of ``timm`` / ``open_clip``; finds nothing itself."""

    def __init__(self):
        self.depth = 0

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED or path is not None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def fire(self):
        uninstall()
        if "crate_alpha" in sys.modules:  # crate_alpha itself is importing timm / open_clip
            return
        try:
            import crate_alpha  # noqa: F401  (registers the models)
        except Exception as exc:  # one line instead of a broken interpreter; the import shows the traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            sys.stderr.write(f"crate-alpha: CRATE-α models not registered with timm / open_clip "
                             f"({type(exc).__name__}: {first}); `python -c 'import crate_alpha'` shows why, "
                             f"{ENV}=0 turns this off\n")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in OFF


def install() -> None:
    """Puts the finder in front of ``sys.meta_path`` (once), unless switched off or already done."""
    if not enabled() or any(isinstance(f, Finder) for f in sys.meta_path):
        return
    if "crate_alpha" in sys.modules or WATCHED <= sys.modules.keys():
        return
    sys.meta_path.insert(0, Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, Finder)]


install()
