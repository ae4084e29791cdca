"""How long a scan will take, told before it starts: the model's arithmetic per image and a measured rate.

The work of a Neural Cleanse scan is, at most, ``levels × labels × steps × batches_per_step × batch_size`` images
through the model's forward and backward pass (early stopping only shortens it). The forward's FLOPs are counted
once with :class:`torch.utils.flop_counter.FlopCounterMode` on one image; a backward costs about twice a forward
(Kaplan et al. 2020, "Scaling laws", the 6N-per-token rule: 2N forward, 4N backward). When that arithmetic says
the scan is long, a short probe measures this machine's forward+backward rate on the real model (a few passes of
a small batch), and the estimate is the work divided by that rate: an upper bound, since labels stop early.
The estimate itself costs one counted forward for small models and well under a second of probing for large ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: below this much arithmetic (FLOP) a scan is short on any CPU: no probe, no estimate shown
PROBE_ABOVE_FLOP = 5e12
#: images per probe pass, and passes timed (after one warm-up)
PROBE_BATCH = 2
PROBE_PASSES = 1


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


def scan_images(config: Any, num_classes: int) -> int:
    """Upper bound of the images a Neural Cleanse scan puts through the model (``config``: its ScanConfig)."""
    inv = config.inversion
    labels = len(config.labels) if config.labels is not None else num_classes
    per_label = inv.steps * inv.resolved_batches_per_step(inv.samples) * inv.batch_size
    levels = len(config.modes) + (len(config.cnn_patch_sizes) - 1 if "patch" in config.modes else 0)
    return int(levels * labels * per_label)


def estimate_seconds(wrapper: ModelWrapper, config: Any, threads: int | None = None) -> float | None:
    """Seconds a scan with ``config`` should take at most on this machine, or None when it is short anyway.

    The inversions share the machine's threads (side by side or one after the other), so the measured rate on all
    threads is the rate of the whole scan.
    """
    try:
        images = scan_images(config, wrapper.num_classes)
        flop = 3.0 * forward_flops(wrapper) * images
        if flop < PROBE_ABOVE_FLOP:
            return None
        with torch.enable_grad():
            rate = images_per_second(wrapper)
        wrapper.zero_grad(set_to_none=True)
        log.info("scan estimate: %d images, %.3g FLOP, %.1f images/s", images, flop, rate)
        return images / rate
    except Exception as e:  # an estimate must never stop a scan
        log.info("no scan estimate: %s", e)
        return None
