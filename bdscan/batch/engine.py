"""The batch engine: each model is one Ray task, on an embedded local Ray or on a cluster.

* **Embedded** (no address): ``ray.init`` with this machine's CPUs and GPUs, no dashboard, quiet logs, usage
  statistics off, and every Ray process bound to 127.0.0.1 (an embedded Ray serves this process only, so none
  of its ports is opened to the network). It is shut down at the end. A Ray already initialised in this process
  (a test, a notebook) is used as it is and left running.
* **Cluster** (``--ray-address auto``, ``HOST:PORT`` or ``ray://HOST:PORT``): ``ray.init(address=...)``. Every
  node needs bdscan installed and must read the models and data at the paths the driver gives (a shared
  file system); outputs come back to the driver (:mod:`bdscan.batch.task`).

Each task declares its resources: ``cpus_per_model`` CPUs (torch runs on as many threads, so tasks never
oversubscribe a node) and one GPU with ``--device cuda``. Tasks are submitted as slots free up (at most as many
in flight as the cluster's CPUs hold), so "running" is what runs and a Ctrl-C has little to cancel. A worker that
dies (killed, out of memory) is retried ``max_retries`` times by Ray, then recorded as an error; a scan's own
errors never kill the worker (the task returns them). Ctrl-C cancels the running tasks (``ray.cancel(force=True)``)
and returns the jobs that did not finish, so the caller still writes the summary of those that did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bdscan.batch.inputs import Job
from bdscan.batch.task import TaskResult, scan_one
from bdscan.detect import DETECTORS
from bdscan.errors import BdscanError, UsageError, first_line

log = logging.getLogger(__name__)

#: the built-in detectors' package: its modules need no import in a worker
_BUILTIN = "bdscan."
#: the environment of an embedded Ray's processes (see :func:`_loopback`)
_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class EngineOptions:
    """How the batch runs on Ray.

    Attributes:
        address: a cluster's address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None starts an embedded Ray.
        cpus_per_model: CPUs (and torch threads) each task declares.
        max_retries: how many times Ray reruns a task whose worker died.
        num_cpus: the embedded Ray's CPUs (None: this machine's).
        object_store_mb: the embedded Ray's object store (results are a model's reports, a few MB).
    """

    address: str | None = None
    cpus_per_model: int = 1
    max_retries: int = 2
    num_cpus: int | None = None
    object_store_mb: int = 256


@contextlib.contextmanager
def _loopback(ray: Any) -> Iterator[None]:
    """While Ray starts: every Ray process on 127.0.0.1, no usage statistics (restored afterwards).

    Ray resolves "this node's address" to the host's network address unless it runs without multi-node support
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: read into a constant when ``ray`` is imported, and inherited by the
    processes ``ray.init`` starts); with the address 127.0.0.1 its servers listen on the loopback interface only.
    """
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in _LOCAL_ENV}
    was = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(_LOCAL_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local_ray(num_cpus: int | None = None, object_store_mb: int = 256) -> Any:
    """Starts an embedded Ray on 127.0.0.1 (see the module docstring) and returns the ``ray`` module."""
    import ray

    try:  # address "local": always a new instance, never one a `ray start` left running on this machine
        with _loopback(ray):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, object_store_memory=object_store_mb << 20, namespace="bdscan")
    except Exception as e:  # ports, /tmp or shared memory: the machine's, not the user's options
        raise BdscanError(f"cannot start a local Ray: {first_line(e, 200)}",
                          "check that /tmp is writable and local ports can be opened, or join a cluster with --ray-address") from e
    return ray


def plugin_modules(jobs: Sequence[Job]) -> tuple[str, ...]:
    """The modules that define the jobs' detectors, for those not built into bdscan (a worker imports them)."""
    mods = {type(DETECTORS[name]).__module__ for job in jobs for name in job.request.detectors if name in DETECTORS}
    return tuple(sorted(m for m in mods if not m.startswith(_BUILTIN) and m != "__main__"))


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raises :class:`UsageError` at once when nothing answers at ``HOST:PORT`` (or ``ray://HOST:PORT``); Ray itself
    would retry for minutes. ``auto`` is left to Ray (it finds the address of a cluster started on this machine)."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UsageError(f"--ray-address {address}: nothing answers there ({first_line(e, 100)})",
                         "check the address (the head node's port, 6379 by default), or leave --ray-address out for a local Ray") from None


@dataclass
class EngineRun:
    """How a run ended: interrupted (Ctrl-C) or not, and the jobs that did not finish."""

    interrupted: bool
    not_finished: list[Job]


class RayEngine:
    """Runs jobs as Ray tasks (``with RayEngine(options) as engine: engine.run(...)``)."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.ray: Any = None
        self.owned = False
        self.startup_s = 0.0
        self.shutdown_s = 0.0

    def __enter__(self) -> RayEngine:
        t0 = time.perf_counter()
        o = self.options
        import ray

        if o.address is None:
            if not ray.is_initialized():
                start_local_ray(o.num_cpus, o.object_store_mb)
                self.owned = True
        else:
            if ray.is_initialized():
                raise UsageError("--ray-address: this process already runs a Ray instance", "leave --ray-address out to use it")
            check_reachable(o.address)
            try:
                ray.init(address=o.address, log_to_driver=False, logging_level=logging.ERROR, namespace="bdscan")
            except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray's errors for a bad or dead address
                raise UsageError(f"--ray-address {o.address}: cannot join the Ray cluster ({first_line(e, 160)})",
                                 "start one with `ray start --head`, or leave --ray-address out for a local Ray") from None
            self.owned = True
        self.ray = ray
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned and self.ray is not None:
            t0 = time.perf_counter()
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            self.shutdown_s = time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------------------------

    def _nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def slots(self, gpu: bool) -> int:
        """How many tasks fit the cluster at once."""
        res = self.ray.cluster_resources()
        n = int(res.get("CPU", 0) // self.options.cpus_per_model)
        if gpu:
            n = min(n, int(res.get("GPU", 0)))
        return max(1, n)

    def check(self, jobs: Sequence[Job]) -> None:
        """Raises :class:`UsageError` when no node could ever run a task (Ray would wait for ever)."""
        nodes = self._nodes()
        cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if cpus < self.options.cpus_per_model:
            raise UsageError(f"--cpus-per-model {self.options.cpus_per_model}: no node of the Ray cluster has that many CPUs "
                             f"(the largest has {cpus:g})", "lower --cpus-per-model")
        gpus = any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
        if any(j.request.settings.device == "cuda" for j in jobs) and not gpus:
            raise UsageError("--device cuda but no node of the Ray cluster has a GPU", "use --device cpu")

    def describe(self) -> dict[str, Any]:
        """The engine as the summary records it: Ray's version, the address, the cluster's resources."""
        res = {k: v for k, v in self.ray.cluster_resources().items() if not k.startswith("node:")}
        address = self.options.address or ("local (embedded, 127.0.0.1)" if self.owned else "local (already running in this process)")
        return {"name": "ray", "ray_version": self.ray.__version__, "address": address,
                "nodes": len(self._nodes()), "cluster_resources": res, "cpus_per_model": self.options.cpus_per_model,
                "max_retries": self.options.max_retries, "startup_s": round(self.startup_s, 3)}

    def task_options(self, job: Job) -> dict[str, Any]:
        """The resources and retries one task declares."""
        gpu = job.request.settings.device == "cuda"
        return {"num_cpus": self.options.cpus_per_model, "num_gpus": 1 if gpu else 0, "max_retries": self.options.max_retries,
                "retry_exceptions": False, "name": f"bdscan scan {job.path}"[:200]}

    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, TaskResult, float], None],
            on_running: Callable[[int], None] | None = None) -> EngineRun:
        """Runs ``jobs``; calls ``on_done(job, result, wall seconds)`` in the driver as each finishes.

        Returns:
            whether Ctrl-C stopped it, and the jobs that did not finish then.
        """
        ray = self.ray
        self.check(jobs)
        remote = ray.remote(scan_one)
        plugins = plugin_modules(jobs)
        slots = self.slots(gpu=all(j.request.settings.device == "cuda" for j in jobs))
        pending = deque(jobs)
        inflight: dict[Any, tuple[Job, float]] = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < slots:
                    job = pending.popleft()
                    ref = remote.options(**self.task_options(job)).remote(job.request, self.options.cpus_per_model, plugins, job.path)
                    inflight[ref] = (job, time.perf_counter())
                if on_running is not None:
                    on_running(len(inflight))
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for ref in ready:
                    job, t0 = inflight.pop(ref)
                    on_done(job, self._result(ref), time.perf_counter() - t0)
        except KeyboardInterrupt:
            for ref in inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            return EngineRun(True, [j for j, _ in inflight.values()] + list(pending))
        return EngineRun(False, [])

    def _result(self, ref: Any) -> TaskResult:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # the worker died on every try (killed, out of memory, its node lost)
            tries = self.options.max_retries + 1
            return TaskResult("error", error=f"the worker running the scan died {tries} time(s) ({type(e).__name__}: "
                                             f"{first_line(e, 160)}); the batch went on", error_type=type(e).__name__)
