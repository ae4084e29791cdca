"""Configuration of trigger inversion (Neural Cleanse's optimisation) and its named budgets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from bdscan.errors import UsageError

#: the default level of the combined verdict, chosen on the evaluation zoo's calibration half by the rule written down
#: before its data (docs/verdict.md, "How α will be chosen", and its result): the largest of 0.01 / 0.02 / 0.05 /
#: 0.1, at most 0.05, that flags at most 5 % of the calibration clean models
DEFAULT_ALPHA = 0.05
#: whether :data:`DEFAULT_ALPHA` still waits to be chosen on calibration data (``verdict.alpha_provisional``; documents
#: written before the choice say true)
ALPHA_PROVISIONAL = False

#: images per batched forward and per torch thread on a CPU: past it a chunk's activations outgrow the core's
#: caches and throughput falls (measured: benchmarks/README.md, "Label chunks (adopted)")
CPU_CHUNK_IMAGES_PER_THREAD = 32


def images_per_chunk(chunk: int | None, device: str, input_size: tuple[int, ...], cpu_pixels: int, gpu_pixels: int) -> int:
    """Images per batched forward: ``chunk`` when set, else a pixel budget (``cpu_pixels`` or, on a GPU,
    ``gpu_pixels``) over the pixels of one input, at least 1."""
    if chunk is not None:
        return chunk
    return max(1, (gpu_pixels if str(device).startswith("cuda") else cpu_pixels) // math.prod(input_size))


#: values of :attr:`InversionConfig.precision`
PRECISIONS = ("auto", "fp32", "bf16")
#: every level a scan can run: pixel-level Neural Cleanse, the patch level (a mask on the model's token grid) and
#: the blend level (one mask value for the whole image: a trigger spread thinly over every pixel)
LEVELS = ("pixel", "patch", "blend")
#: the levels a scan runs unless told otherwise
MODES = ("pixel", "patch")
#: names that stand for several levels in ``--levels``
LEVEL_GROUPS: dict[str, tuple[str, ...]] = {"both": ("pixel", "patch"), "default": MODES, "all": LEVELS}


def parse_levels(text: str) -> tuple[str, ...]:
    """``--levels``' value: comma-separated levels or group names, e.g. "pixel,blend", "both", "all"; returned in
    :data:`LEVELS` order, each once. Raises :class:`UsageError` for an unknown or empty choice."""
    items = [x.strip().lower() for x in str(text).split(",") if x.strip()]
    chosen: set[str] = set()
    for x in items:
        if x in LEVEL_GROUPS:
            chosen.update(LEVEL_GROUPS[x])
        elif x in LEVELS:
            chosen.add(x)
        else:
            raise UsageError(f"unknown level {x!r}", f"use {', '.join(LEVELS)} (comma-separated), or {', '.join(LEVEL_GROUPS)}")
    if not chosen:
        raise UsageError("no level chosen", f"use {', '.join(LEVELS)} (comma-separated), or {', '.join(LEVEL_GROUPS)}")
    return tuple(m for m in LEVELS if m in chosen)


#: ``--second-look``'s named values: the budget's own schedule (:data:`BUDGET_SECOND_LOOK`), or one look
SECOND_LOOK_NAMES = ("auto", "off")


#: what ``--second-look`` takes, for every message that refuses a value
SECOND_LOOK_HINT = "give auto, off or FIRST_STEPS:ALPHA_FIRST:CLEAN_ABOVE, e.g. 30:0.02:0.5 (with --steps 90)"


def parse_second_look(value: object) -> tuple[int, float, float] | str:
    """``--second-look``'s value: "auto" (the budget's own schedule), "off" (one look at the budget's steps), or
    "FIRST_STEPS:ALPHA_FIRST:CLEAN_ABOVE" (e.g. "30:0.02:0.5"), or such a sequence; whether it fits the budget and
    alpha is checked when the scan is configured. Raises :class:`UsageError`."""
    if isinstance(value, str) and value.strip().lower() in SECOND_LOOK_NAMES:
        return value.strip().lower()
    items = [str(x).strip() for x in value] if isinstance(value, (list, tuple)) else str(value).split(":")
    hint = SECOND_LOOK_HINT
    if len(items) != 3:
        raise UsageError(f"second look {value!r} is not three values", hint)
    try:
        first, a1, clean = int(items[0]), float(items[1]), float(items[2])
    except ValueError:
        raise UsageError(f"second look {value!r} is not a step count and two probabilities", hint) from None
    return first, a1, clean


@dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of the trigger-inversion core.

    Defaults are Neural Cleanse's (Wang et al., S&P 2019, and its public release ``visualizer.py``).

    Attributes:
        steps: maximum optimisation "steps"; as in the original, one step is a pass over
            ``batches_per_step`` mini-batches, after which λ and early stopping are updated.
        samples: clean samples drawn (balanced over classes) for the optimisation.
        batch_size: images per mini-batch.
        batches_per_step: mini-batches per step; None = ``samples // batch_size`` (a full epoch).
        lr: Adam learning rate.
        betas: Adam betas.
        init_cost: λ once the attack first succeeds (λ starts at 0).
        cost_up: multiply λ by this after ``patience`` successful steps in a row.
        cost_down: divide λ by this after ``patience`` failing steps in a row.
        patience: see above.
        success: attack success threshold (share of stamped clean images of other classes sent to the label).
        early_stop: stop a label after ``early_stop_patience`` steps without a ``1 - early_stop_threshold``
            improvement of its best norm, once λ has moved both up and down.
        early_stop_patience: see above.
        early_stop_threshold: see above.
        label_chunk: labels optimised together in one batched forward; None = automatic: on a CPU as many as
            make about :data:`CPU_CHUNK_IMAGES_PER_THREAD` images per torch thread per forward (measured fastest,
            benchmarks/README.md), on a GPU up to 64 labels.
        batched: optimise labels together (False = label by label, as the original).
        seed: seed of mask/pattern initialisation and of the mini-batch order.
        precision: arithmetic of the model's forward and backward: "fp32", "bf16" (autocast; the trigger's
            parameters, its size and λ stay float32) or "auto" (bf16 for a model without a token grid on a
            CPU with native bf16 instructions, where it measured about twice as fast; fp32 otherwise).
            Resolved by the scan before it runs, so reports carry the value that ran.
    """

    steps: int = 1000
    samples: int = 1000
    batch_size: int = 32
    batches_per_step: int | None = None
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0**1.5
    patience: int = 5
    success: float = 0.99
    early_stop: bool = True
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99
    label_chunk: int | None = None
    batched: bool = True
    seed: int = 0
    precision: str = "fp32"

    def resolved_batches_per_step(self, n_samples: int) -> int:
        return self.batches_per_step or max(1, n_samples // self.batch_size)

    def resolved_label_chunk(self, device: str, threads: int | None = None) -> int:
        """Labels per batched forward; ``threads``: the torch threads one inversion runs on (None = all)."""
        if self.label_chunk is not None:
            return self.label_chunk
        if str(device).startswith("cuda"):
            return 64
        if threads is None:
            import torch  # here, so that configurations stay importable without loading torch

            threads = torch.get_num_threads()
        return max(1, CPU_CHUNK_IMAGES_PER_THREAD * threads // self.batch_size)

    def with_(self, **changes: Any) -> InversionConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> InversionConfig:
        if self.steps < 1 or self.samples < 1 or self.batch_size < 1 or (self.label_chunk is not None and self.label_chunk < 1):
            raise UsageError("steps, samples, batch size and label chunk must be positive", "check the --budget options")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}", f"use one of: {', '.join(PRECISIONS)}")
        if not 0 < self.success <= 1:
            raise UsageError(f"success threshold {self.success} is not in (0, 1]", "use e.g. 0.99")
        return self


#: named budgets for ``--budget``. "original" is Neural Cleanse's own schedule, unchanged.
BUDGETS: dict[str, InversionConfig] = {
    "original": InversionConfig(),
    "thorough": InversionConfig(steps=300, samples=1000, batch_size=32, early_stop_patience=20, precision="auto"),
    # The default: a step is 2 mini-batches, not an epoch, and its steps are those of the second look (below). No
    # early stop: with a 6-step patience it froze some labels before their mask had shrunk (one at 2.7x the size it
    # reached by step 30), and such labels carried most of the seed-to-seed noise of the sizes; letting every label
    # run costs about 3 % more label-steps (docs/verdict.md).
    "fast": InversionConfig(steps=90, samples=160, batch_size=16, batches_per_step=2, patience=2, early_stop=False,
                            early_stop_patience=6, precision="auto"),
    # For a CI gate that must finish in half the time: half the images of "fast" (4 mini-batches of 4 per step)
    # but twice its Adam updates, so its masks end closer to the sizes Neural Cleanse's own schedule converges to;
    # it gets fewer of the zoo's verdicts right, so it is not the default (benchmarks/README.md, "The quick budget").
    # No early stop, for the reason given for "fast": a label frozen early is where the seed-to-seed noise comes from.
    "quick": InversionConfig(steps=30, samples=160, batch_size=4, batches_per_step=4, patience=2, early_stop=False,
                             early_stop_patience=6, precision="auto"),
    "smoke": InversionConfig(steps=12, samples=64, batch_size=32, batches_per_step=2, patience=2, early_stop_patience=4,
                             precision="auto"),
}
DEFAULT_BUDGET = "fast"

#: the two-look schedule a budget runs by default (``--second-look auto``): (first_steps, the share of alpha spent on
#: the first look, clean_above), as :class:`bdscan.detect.scan.SecondLook` takes them once alpha is known. "fast":
#: judge after 30 steps, run every class on to the budget's 90 only when that first verdict is in doubt: at 30 steps
#: the masks of accurate models are often still shrinking, and where they stand depends on the seed; 90 steps on
#: every scan would cost every scan three times as much. Chosen on the evaluation zoo's calibration half
#: (benchmarks/README.md, "The second look"). A budget not named here looks once.
BUDGET_SECOND_LOOK: dict[str, tuple[int, float, float]] = {"fast": (30, 0.4, 0.5)}


def budget(name: str) -> InversionConfig:
    """The named budget; raises :class:`UsageError` for an unknown name."""
    if name not in BUDGETS:
        raise UsageError(f"unknown budget {name!r}", f"use one of: {', '.join(BUDGETS)}")
    return BUDGETS[name]
