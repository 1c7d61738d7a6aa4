"""prac: post-training pruning of large language models with reconstruction correction.

The package is layered; a layer imports only the ones below it (checked by ``lint-imports``, the
contract is in pyproject.toml; docs/architecture.md draws the flow):

    cli → jobs | spectral → io → parallel → engine → methods | quant → correction → model → core

Each folder's ``__init__`` says what lives there. The ``prac.cli`` package is the only place that
parses arguments.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

#: Modules of the former flat layout → where they live now. Importing an old name still works for one
#: release (with a DeprecationWarning) and gives the very module object of the new name.
MOVED = {
    "errors": "core.errors", "linalg": "core.linalg", "treesum": "core.treesum", "digest": "core.digest",
    "progress": "core.progress", "records": "core.records",
    "blocks": "model.blocks", "units": "model.units", "experts": "model.experts", "loading": "model.loading",
    "stats": "model.stats", "group": "model.group",
    "masks": "methods.masks", "sparsegpt": "methods.sparsegpt", "admm": "methods.admm",
    "admm_blocks": "methods.admm_blocks", "patterns": "methods.patterns",
    "quantize": "quant.gptq", "compressed": "quant.formats.compressed",
    "pipeline": "engine.pipeline", "reconstruct": "engine.reconstruct", "replay": "engine.replay",
    "residency": "engine.residency",
    "distributed": "parallel.session", "harness": "parallel.harness", "evaluate": "parallel.evaluate",
    "saving": "io.saving", "source_files": "io.source_files", "outputs": "io.outputs", "report": "io.report",
    "cache": "io.cache", "data": "io.data", "assets": "io.assets",
    "verify": "jobs.verify", "allocation": "jobs.allocation", "allocation_plot": "jobs.allocation_plot",
}
# (prac.methods, prac.engine and prac.jobs are packages now; their __getattr__ serves the old names.)


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``prac.<old>`` for the modules in :data:`MOVED` and hands back the module of the new name."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head != "prac" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = "prac." + MOVED[spec.name.split(".", 1)[1]]
        warnings.warn(f"{spec.name} moved to {new}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):  # the new module is already executed
        pass


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.insert(0, _Moved())  # before the path finder: prac/assets is also a folder of data
