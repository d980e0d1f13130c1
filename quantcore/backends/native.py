"""quantcore's own engine: mergeable statistics collected in one pass, exact merge across ranks, then
the registered calibrators' range searches (:mod:`quantcore.calib`)."""
from __future__ import annotations

from typing import Any, Iterable

from . import Backend


class NativeBackend(Backend):
    name = "native"

    def calibrate(self, model, batches: Iterable, max_batches: int | None = None, progress: Any = None):
        from .. import api

        res = api.collect(model, batches, max_batches, progress)
        api.sync_calibration(model, res)  # ranks' statistics merged exactly (no-op in one process)
        return api.finalize(model, res)
