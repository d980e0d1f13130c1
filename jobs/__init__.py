"""Launchers for quantcore batch jobs: TorchX components (:mod:`jobs.components`), the container
entrypoint that loads S3 credentials from a Kubernetes Secret (:mod:`jobs.launch`) and the Ray PTQ
sweep (:mod:`jobs.ray_sweep`).

They are thin: each one ends in the ``quantcore`` CLI or in :func:`quantcore.pipeline.ptq`.
``jobs`` is shipped as source next to the package (the image puts it on ``PYTHONPATH``); run the
modules from the repository root or with ``PYTHONPATH`` pointing at it.
"""
