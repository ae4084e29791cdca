"""Scanning a model registry: many models in one command, each a Ray task (README, "Scanning a registry").

* :mod:`bdscan.batch.inputs`: model paths, folders walked recursively and manifest rows -> jobs
  (:mod:`bdscan.batch.manifest` reads JSON, JSON Lines, YAML and CSV; :mod:`bdscan.batch.options` parses and
  validates each row's scan options);
* :mod:`bdscan.batch.engine`: Ray (embedded on 127.0.0.1, or a cluster), one task per model with declared
  resources, retries of dead workers, Ctrl-C;
* :mod:`bdscan.batch.task`: the task, which calls :func:`bdscan.pipeline.run_scan`;
* :mod:`bdscan.batch.cache`: results cached under the output folder by model, data, configuration and version;
* :mod:`bdscan.batch.outputs`: each model's folder, ``summary.json``, one SARIF log, ``index.html``;
* :mod:`bdscan.batch.run`: :func:`run_batch`, the whole batch for any caller (it never prints).

Ray is imported only when a batch runs, so ``bdscan scan MODEL`` (one model, in-process) never pays for it.
"""

from bdscan.batch.engine import EngineOptions
from bdscan.batch.inputs import Job, Plan, Skipped, plan_batch
from bdscan.batch.run import BatchEvents, BatchResult, check_plan_out, run_batch

__all__ = ["BatchEvents", "BatchResult", "EngineOptions", "Job", "Plan", "Skipped", "check_plan_out", "plan_batch", "run_batch"]
