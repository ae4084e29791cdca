"""How long a scan will take, told before it starts: the model's arithmetic per image and a measured rate.

The work of a Neural Cleanse scan is, at most, ``levels × labels × steps × batches_per_step × batch_size`` images
through the model's forward and backward pass (early stopping only shortens it). The forward's FLOPs are counted
once with :class:`torch.utils.flop_counter.FlopCounterMode` on one image; a backward costs about twice a forward
(Kaplan et al. 2020, "Scaling laws", the 6N-per-token rule: 2N forward, 4N backward). When that arithmetic says
the scan is long, a short probe measures this machine's forward+backward rate on the real model the way the scan
runs it: the inversions side by side, each on its share of the threads, with the images one batched forward of the
scan holds (fewer for a large model, so that the probe stays near a second). It counts the model's passes only: on
a 32×32 CCT it was within a few per cent of the measured scan, at 224×224 (inputs resized on every step) 9-24 % under
(benchmarks/README.md, "224×224 inputs"). With a two-look schedule the scan usually ends at its first look; the
estimate gives both. The other detectors say how many images they put through the model
(:meth:`bdscan.detect.base.Detector.passes`), counted at the same measured rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from bdscan.machine import torch_threads
from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: below this much arithmetic (FLOP) a scan is short on any CPU: no probe, no estimate shown
PROBE_ABOVE_FLOP = 5e12
#: the fewest images per probe pass, and passes timed (after one warm-up)
PROBE_BATCH = 2
PROBE_PASSES = 1
#: at most this much arithmetic (FLOP, forward and backward) per probe pass: about a second on one CPU core (a
#: 224×224 ViT-Tiny/16 ran 9.3 images/s of 3.8 GFLOP each on one thread: benchmarks/README.md, "224×224 inputs")
PROBE_PASS_FLOP = 3e10


@dataclass(frozen=True)
class ScanEstimate:
    """How long a scan's detection should take on this machine.

    Attributes:
        full_s: seconds when every inversion runs all its steps (with two looks, both of them; early stopping makes
            a scan shorter, and the scan's own work besides the model's passes, e.g. resizing inputs, longer).
        first_look_s: seconds to the first look's verdict, where the schedule has two looks (None: one look).
    """

    full_s: float
    first_look_s: float | None = None

    @property
    def likely_s(self) -> float:
        """Seconds of the scan that ends at its first look (most do), or of the one look."""
        return self.first_look_s if self.first_look_s is not None else self.full_s


def forward_flops(wrapper: ModelWrapper) -> float:
    """FLOPs of one forward pass of one image (multiply-adds count 2), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(wrapper.parameters(), torch.empty(0)).device
    x = torch.rand((1, *wrapper.input_size), device=dev)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        wrapper(x)
    return float(counter.get_total_flops())


def images_per_second(wrapper: ModelWrapper, batch: int = PROBE_BATCH, passes: int = PROBE_PASSES) -> float:
    """Measured forward+backward (gradient to the input, as a trigger inversion needs) images per second."""
    dev = next(wrapper.parameters(), torch.empty(0)).device
    x = torch.rand((batch, *wrapper.input_size), device=dev, requires_grad=True)
    wrapper.eval()

    def once() -> None:
        wrapper(x).logsumexp(1).sum().backward()

    once()  # warm-up: allocations, kernel choice
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(passes):
        once()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch * passes / max(time.perf_counter() - t0, 1e-9)


def inversions(config: Any) -> int:
    """How many inversions a scan with ``config`` (its ScanConfig) runs over all labels: one per level, and one per
    patch size of the sweep on a model without a token grid (counted at its largest, for an upper bound)."""
    return len(config.modes) + (len(config.cnn_patch_sizes) - 1 if "patch" in config.modes else 0)


def scan_images(config: Any, num_classes: int) -> int:
    """The most images a Neural Cleanse scan puts through the model (``config``: its ScanConfig)."""
    inv = config.inversion
    labels = len(config.labels) if config.labels is not None else num_classes
    per_label = inv.steps * inv.resolved_batches_per_step(inv.samples) * inv.batch_size
    return int(inversions(config) * labels * per_label)


def probe_batch(flop_per_image: float, scan_batch: int) -> int:
    """Images per probe pass: one batched forward of the scan (``scan_batch``), fewer for a model whose
    forward+backward costs ``flop_per_image``, so that one pass stays near :data:`PROBE_PASS_FLOP`."""
    return int(max(PROBE_BATCH, min(scan_batch, PROBE_PASS_FLOP // max(flop_per_image, 1.0))))


def estimate_seconds(wrapper: ModelWrapper, config: Any | None, threads: int | None = None,
                     other_passes: float = 0.0) -> ScanEstimate | None:
    """How long a scan with ``config`` (its ScanConfig) should take on this machine, or None when it is short anyway.

    Args:
        wrapper: the model, on the CPU.
        config: the Neural Cleanse scan configuration (levels, labels, inversion schedule, second look, workers), or
            None when Neural Cleanse does not run.
        threads: torch threads the scan will run on (None: torch's current setting).
        other_passes: the other detectors' forward+backward images (their ``Detector.passes``), which run after
            Neural Cleanse on all the threads, at any look.

    Returns:
        :class:`ScanEstimate`, or None for a scan of under :data:`PROBE_ABOVE_FLOP` or when the probe fails.
    """
    try:
        images = scan_images(config, wrapper.num_classes) if config is not None else 0
        per_image = 3.0 * forward_flops(wrapper)
        if images + other_passes <= 0 or per_image * (images + other_passes) < PROBE_ABOVE_FLOP:
            return None
        threads = threads or torch.get_num_threads()
        if config is not None:
            # the scan's own arrangement (bdscan.detect.scan.scan): its workers side by side, each on its share of
            # the threads, each putting a chunk of labels × batch through one forward
            workers = config.resolved_workers(inversions(config), threads)
            inv = config.inversion
            scan_batch = inv.resolved_label_chunk("cpu", max(1, threads // workers)) * inv.batch_size
        else:
            workers, scan_batch = 1, PROBE_BATCH
        per_worker = max(1, threads // workers)
        batch = probe_batch(per_image, scan_batch)
        with torch.enable_grad(), torch_threads(per_worker):
            rate = workers * images_per_second(wrapper, batch)
        wrapper.zero_grad(set_to_none=True)
        nc_full = images / rate
        # the other detectors are counted at the rate of Neural Cleanse's workers together (on all the threads)
        other = other_passes / rate
        look = getattr(config, "second_look", None)
        first = nc_full * look.first_steps / config.inversion.steps + other if look is not None else None
        log.info("scan estimate: %d images at most (and %.0f for the other detectors), %.3g FLOP, %.1f images/s "
                 "(%d workers × %d threads, probe batch %d)", images, other_passes, per_image * (images + other_passes),
                 rate, workers, per_worker, batch)
        return ScanEstimate(nc_full + other, first)
    except Exception as e:  # an estimate must never stop a scan
        log.info("no scan estimate: %s", e)
        return None
