"""Start-up hook installed by ``dam_mergekit_autoload.pth``: registers DAM when mergekit loads.

Python runs the ``.pth`` line in every process, so this module must stay cheap: it imports nothing
heavy and only puts a finder on ``sys.meta_path``. When (and only when) a process imports mergekit,
the finder runs two callbacks right after the module has executed:

- ``mergekit.merge_methods``: register ``dam`` and ``defense_aware_merging``;
- ``mergekit.merge``: route ``run_merge`` through DAM's pre-flight guard (other methods unchanged);
- ``mergekit.scripts.run_yaml``: the same for the stock script's own reference, with one-line errors.

``DAM_MERGEKIT_AUTOLOAD=0`` switches it off (checked in the ``.pth`` line itself).
"""

from __future__ import annotations

import importlib.util
import sys

TYPE_CHECKING = False  # the idiom that avoids importing typing at start-up

if TYPE_CHECKING:  # annotations only: keep start-up imports minimal
    from collections.abc import Callable
    from types import ModuleType


def _register(_module: ModuleType) -> None:
    method = sys.modules.get("dam_mergekit.method")
    if method is not None and not hasattr(method, "register_methods"):
        # dam_mergekit.method is itself being imported (it imports mergekit first): it registers
        # the methods at its end when it sees this flag.
        global REGISTER_PENDING
        REGISTER_PENDING = True
        return
    from dam_mergekit.method import register_methods

    register_methods()


REGISTER_PENDING = False


def _guard(_module: ModuleType) -> None:
    from dam_mergekit.recipe.run import install_guard

    install_guard()


CALLBACKS: dict[str, Callable[[ModuleType], None]] = {
    "mergekit.merge_methods": _register,
    "mergekit.merge": _guard,
    # the stock script binds run_merge at import: guard its copy too (refusals become one line)
    "mergekit.scripts.run_yaml": _guard,
}


class _RunAfterExec:
    """Wraps a module's real loader to call ``callback`` once the module has executed."""

    def __init__(self, loader, callback: Callable[[ModuleType], None]):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        try:
            self._callback(module)
        except Exception as err:  # never break mergekit itself
            import logging

            logging.getLogger("dam_mergekit").warning(
                "dam-mergekit could not hook into %s: %s", module.__name__, err
            )

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class PostImportFinder:
    """Finds nothing itself; wraps the loader of the watched modules that others find."""

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        callback = CALLBACKS.get(fullname)
        if callback is None or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterExec(spec.loader, callback)
        return spec


def install() -> None:
    if not any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    # mergekit already imported (the hook was installed late): run the callbacks now.
    for name, callback in CALLBACKS.items():
        if name in sys.modules:
            try:
                callback(sys.modules[name])
            except Exception:  # noqa: BLE001 - same policy as above
                pass


install()
