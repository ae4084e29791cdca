"""The inversion core on tiny models trained in the test session."""

import pytest
import torch

from bdscan.detect.config import BUDGETS
from bdscan.detect.inversion import Inversion, invert, prepared
from bdscan.detect.params import PixelTrigger
from bdscan.detect.scan import ScanConfig, scan
from tests.conftest import CLASSES, SIZE, TARGET
from tests.synth import square_trigger, train_tiny

SMOKE = BUDGETS["smoke"].with_(steps=20)


def test_batched_equals_sequential(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    cfg = BUDGETS["smoke"].with_(steps=8, samples=48)
    labels = [0, 3, 7]
    batched = invert(w, data, PixelTrigger(SIZE, SIZE), labels, cfg)
    seq = invert(w, data, PixelTrigger(SIZE, SIZE), labels, cfg.with_(batched=False))
    for a, b in zip(batched.labels, seq.labels, strict=True):
        assert a.label == b.label and a.steps == b.steps and a.succeeded == b.succeeded
        if a.norm is not None:
            assert a.norm == pytest.approx(b.norm, rel=1e-4, abs=1e-4)
        torch.testing.assert_close(a.mask, b.mask, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.pattern, b.pattern, atol=1e-4, rtol=1e-4)


def test_same_seed_same_result_and_seed_matters(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    cfg = BUDGETS["smoke"].with_(steps=5, samples=48)
    r1 = invert(w, data, PixelTrigger(SIZE, SIZE), [1, 2], cfg)
    r2 = invert(w, data, PixelTrigger(SIZE, SIZE), [1, 2], cfg)
    r3 = invert(w, data, PixelTrigger(SIZE, SIZE), [1, 2], cfg.with_(seed=1))
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(r1.labels, r2.labels, strict=True))
    assert not all(torch.equal(a.mask, b.mask) for a, b in zip(r1.labels, r3.labels, strict=True))


def test_planted_backdoor_flagged_with_right_target(tiny_bd) -> None:
    f = scan(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanConfig(modes=("pixel",), inversion=SMOKE))
    assert f.verdict.status == "backdoor"
    assert f.verdict.target == TARGET
    assert f.modes["pixel"].anomaly.anomaly_index > 2


def test_clean_twin_not_flagged(tiny_clean) -> None:
    # at α 0.001: a calibrated test flags about α of clean models, and every kind of CPU trains this one differently
    f = scan(tiny_clean.tiny.wrapper, tiny_clean.tiny.data, ScanConfig(modes=("pixel",), inversion=SMOKE, alpha=0.001))
    assert f.verdict.status == "clean"


def test_phases_and_history_recorded(tiny_bd) -> None:
    r = invert(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, PixelTrigger(SIZE, SIZE), [TARGET], SMOKE).labels[0]
    assert r.succeeded and len(r.phases) == 3 and len(r.history) == r.steps
    norms = [p.norm for p in r.phases if p.norm is not None]
    assert norms == sorted(norms, reverse=True)  # the best-so-far only shrinks
    assert r.phases[-1].norm == pytest.approx(r.norm)
    assert r.phases[-1].mask is not None and r.phases[-1].mask.shape == (SIZE, SIZE)
    # the target's trigger sits where the planted square is (bottom-right corner)
    assert float(r.mask[-5:, -5:].sum()) > 0.5 * float(r.mask.sum())


def test_tiny_vit_patch_aligned_trigger_found_by_patch_mode() -> None:
    trig = square_trigger(SIZE, TARGET, box=4, row=12, col=12)  # exactly one 4x4 token
    t = train_tiny("bdscan_vit", CLASSES, SIZE, trig, epochs=8, n=40 * CLASSES)
    assert t.wrapper.token_grid is not None and t.wrapper.token_grid.stride == 4
    f = scan(t.wrapper, t.data, ScanConfig(modes=("patch",), inversion=SMOKE))
    a = f.modes["patch"].anomaly
    assert a.min_label == TARGET and a.anomaly_index > 2
    assert f.verdict.status == "backdoor" and f.verdict.target == TARGET


def test_history_replays_a_shorter_run(tiny_bd) -> None:
    """`python -m benchmarks schedule` rests on this: a label's best size after step s of a long run is what a run
    of s steps reports, whatever the other labels do (each has its own Adam state, λ and early stop)."""
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    cfg = BUDGETS["smoke"].with_(steps=10, samples=48)
    long = invert(w, data, PixelTrigger(SIZE, SIZE), [0, TARGET, 7], cfg)
    short = invert(w, data, PixelTrigger(SIZE, SIZE), [TARGET, 7], cfg.with_(steps=6))
    for s in short.labels:
        lg = next(r for r in long.labels if r.label == s.label)
        assert s.steps == min(6, lg.steps)
        assert s.history == pytest.approx(lg.history[: s.steps])
        want = lg.history[s.steps - 1]
        assert (s.norm is None) == (want is None)
        if want is not None:
            assert s.norm == pytest.approx(want, rel=1e-5)
    assert any(r.norm is not None for r in short.labels)


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert [r.label for r in a.labels] == [r.label for r in b.labels]
    for x, y in zip(a.labels, b.labels, strict=True):
        keys = ("norm", "steps", "stopped_early", "final_lambda", "success_rate", "history")
        assert [getattr(x, k) for k in keys] == [getattr(y, k) for k in keys]
        assert torch.equal(x.mask, y.mask) and torch.equal(x.pattern, y.pattern) and torch.equal(x.raw_mask, y.raw_mask)
        assert [ph.norm for ph in x.phases] == [ph.norm for ph in y.phases]


def test_an_inversion_stopped_and_continued_is_the_uninterrupted_one(tiny_bd) -> None:
    """What a second look rests on: a run looked at after step s reports exactly an s-step run, and continuing it
    gives exactly the uninterrupted run (parameters, Adam state, λ schedules and batches carry over)."""
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    cfg = BUDGETS["smoke"].with_(steps=10, samples=48, precision="fp32")
    labels, param = [0, TARGET, 7], PixelTrigger(SIZE, SIZE)
    with prepared(w, "fp32", "cpu"):
        run = Inversion(w, data, param, labels, cfg, "cpu")
        run.advance(4)
        assert run.step == 4 and not run.finished
        mid = run.result()
        run.advance()
        end = run.result()
        assert run.finished and run.step <= 10
    _same(mid, invert(w, data, param, labels, cfg.with_(steps=4)))
    _same(end, invert(w, data, param, labels, cfg))
    assert mid.labels[1].steps == 4 and end.labels[1].history[:4] == mid.labels[1].history


@pytest.mark.parametrize(("chunk", "device", "threads", "want"),
                         [(None, "cpu", 1, 1), (None, "cpu", 4, 4), (None, "cuda", 1, 64), (3, "cpu", 1, 3)])
def test_label_chunk_resolution(chunk: int | None, device: str, threads: int, want: int, monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert BUDGETS["smoke"].with_(label_chunk=chunk).resolved_label_chunk(device) == want  # smoke: batch 32


def test_label_chunk_does_not_change_results(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    cfg = BUDGETS["smoke"].with_(steps=6, samples=48)
    a = invert(w, data, PixelTrigger(SIZE, SIZE), [0, 3, 5, 7], cfg.with_(label_chunk=1))
    b = invert(w, data, PixelTrigger(SIZE, SIZE), [0, 3, 5, 7], cfg.with_(label_chunk=4))
    for x, y in zip(a.labels, b.labels, strict=True):
        assert x.steps == y.steps
        torch.testing.assert_close(x.mask, y.mask, atol=1e-4, rtol=1e-4)


def test_scan_keeps_every_parametrisations_history(tiny_bd) -> None:
    f = scan(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanConfig(modes=("patch",), inversion=BUDGETS["smoke"].with_(steps=4),
                                                                 cnn_patch_sizes=(4, 8), cnn_patch_offsets=True))
    m = f.modes["patch"]
    assert len(m.histories) == len(m.params) > 1  # a CNN's patch sweep
    for hs in m.histories.values():
        assert sorted(hs) == list(range(CLASSES)) and all(len(h) <= 4 for h in hs.values())


def test_inversion_never_touches_weight_gradients(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    before = [p.requires_grad for p in w.parameters()]
    w.requires_grad_(True)  # e.g. a model straight from training
    w.zero_grad(set_to_none=True)
    try:
        invert(w, data, PixelTrigger(SIZE, SIZE), [TARGET], BUDGETS["smoke"].with_(steps=2, samples=32))
        assert all(p.grad is None for p in w.parameters())  # no weight gradient was computed
        assert all(p.requires_grad for p in w.parameters())  # and the caller's setting is restored
    finally:
        for p, rq in zip(w.parameters(), before, strict=True):
            p.requires_grad_(rq)


def test_precision_auto_is_bf16_only_for_a_cnn_on_a_cpu_with_bf16(tiny_bd, monkeypatch) -> None:
    from bdscan import machine
    from bdscan.detect import inversion

    cnn = tiny_bd.tiny.wrapper
    vit = train_tiny("bdscan_vit", CLASSES, SIZE, None, epochs=1, n=4 * CLASSES).wrapper
    assert cnn.token_grid is None and vit.token_grid is not None
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    assert inversion.resolve_precision("auto", cnn, "cpu") == "bf16"
    assert inversion.resolve_precision("auto", vit, "cpu") == "fp32"  # measured slower for transformers
    assert inversion.resolve_precision("auto", cnn, "cuda") == "fp32"  # not measured on a GPU yet
    assert inversion.resolve_precision("fp32", cnn, "cpu") == "fp32"
    assert inversion.resolve_precision("bf16", vit, "cpu") == "bf16"  # an explicit choice is kept
    assert not inversion.bf16_emulated("bf16", "cpu")
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    assert inversion.resolve_precision("auto", cnn, "cpu") == "fp32"  # emulated bf16 would be slower
    assert inversion.bf16_emulated("bf16", "cpu")  # a forced bf16 here is what the CLI warns about
    assert not inversion.bf16_emulated("auto", "cpu") and not inversion.bf16_emulated("fp32", "cpu")
    assert not inversion.bf16_emulated("bf16", "cuda")  # a GPU's bf16 does not depend on the CPU
    assert BUDGETS["original"].precision == "fp32"  # Neural Cleanse's own schedule stays float32


def test_unknown_precision_is_a_usage_error() -> None:
    from bdscan.errors import UsageError

    with pytest.raises(UsageError, match="precision"):
        BUDGETS["smoke"].with_(precision="fp8").validate()


def test_bf16_inversion_is_deterministic_finds_the_trigger_and_restores_the_model(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    before = {k: v.clone() for k, v in w.state_dict().items()}
    cfg = SMOKE.with_(precision="bf16")
    f1 = scan(w, data, ScanConfig(modes=("pixel",), inversion=cfg))
    f2 = scan(w, data, ScanConfig(modes=("pixel",), inversion=cfg))
    assert f1.config.inversion.precision == "bf16"
    assert f1.verdict.status == "backdoor" and f1.verdict.target == TARGET
    assert [r.norm for r in f1.modes["pixel"].labels] == [r.norm for r in f2.modes["pixel"].labels]
    fp32 = scan(w, data, ScanConfig(modes=("pixel",), inversion=cfg.with_(precision="fp32")))
    assert [r.norm for r in f1.modes["pixel"].labels] != [r.norm for r in fp32.modes["pixel"].labels]  # bf16 did run
    # the model comes back as it was: same values, same (contiguous) layout, ready for repair or export
    for k, v in w.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k


def test_scan_records_the_precision_that_ran(tiny_bd, monkeypatch) -> None:
    from bdscan import machine

    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    f = scan(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanConfig(modes=("pixel",), inversion=SMOKE.with_(steps=2)))
    assert SMOKE.precision == "auto" and f.config.inversion.precision == "fp32"


@pytest.mark.parametrize(("workers", "device", "inversions", "threads", "want"),
                         [(None, "cpu", 2, 2, 2), (None, "cpu", 2, 1, 1), (None, "cpu", 2, 8, 2), (None, "cpu", 5, 4, 4),
                          (1, "cpu", 2, 2, 1), (None, "cuda", 2, 2, 1)])
def test_workers_resolution(workers: int | None, device: str, inversions: int, threads: int, want: int) -> None:
    assert ScanConfig(workers=workers, device=device).resolved_workers(inversions, threads) == want


@pytest.fixture
def two_threads() -> None:
    """Two torch threads, so that the scan runs its inversions side by side (conftest restores the count)."""
    torch.set_num_threads(2)


@pytest.mark.usefixtures("two_threads")
def test_levels_in_parallel_give_the_sequential_results(tiny_bd) -> None:
    """The scan runs its inversions side by side on a multi-threaded CPU; that must not change a number."""
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    w.requires_grad_(True)  # the caller's setting, to be restored after threads shared the model
    inv = SMOKE.with_(steps=8, samples=48)
    one = scan(w, data, ScanConfig(inversion=inv, workers=1))
    two = scan(w, data, ScanConfig(inversion=inv))
    assert torch.get_num_threads() == 2  # restored after the parallel section
    assert one.config.workers == 1 and two.config.workers == 2  # pixel and patch side by side
    assert all(p.requires_grad for p in w.parameters()) and all(p.grad is None for p in w.parameters())
    w.requires_grad_(False)
    assert one.verdict == two.verdict
    for mode in ("pixel", "patch"):
        a, b = one.modes[mode], two.modes[mode]
        assert a.anomaly.anomaly_index == pytest.approx(b.anomaly.anomaly_index, abs=1e-6)
        for x, y in zip(a.labels, b.labels, strict=True):
            assert x.steps == y.steps and (x.norm is None) == (y.norm is None)
            if x.norm is not None:
                assert x.norm == pytest.approx(y.norm, rel=1e-5)


@pytest.mark.usefixtures("two_threads")
def test_a_failing_inversion_stops_the_one_beside_it_and_its_error_surfaces(tiny_bd) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    calls: dict[str, int] = {"pixel": 0, "patch": 0}

    def progress(name: str, done: int, total: int, stats: dict[str, float]) -> None:
        calls[name] += 1
        if name == "patch":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        scan(w, data, ScanConfig(inversion=SMOKE.with_(steps=40, early_stop=False, samples=48)), progress)
    assert calls["patch"] == 1 and calls["pixel"] < 40  # the pixel level did not run to its end


@pytest.mark.usefixtures("two_threads")
def test_ctrl_c_in_a_parallel_inversion_reaches_the_caller(tiny_bd, monkeypatch) -> None:
    import bdscan.detect.scan as scan_mod

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "invert_prepared", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_bd.tiny.wrapper, tiny_bd.tiny.data, ScanConfig(inversion=SMOKE))
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_nan_model_in_parallel_inversions_is_one_numerical_error(tiny_bd) -> None:
    from bdscan.errors import NumericalError

    class NaNNet(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * float("nan")

    from bdscan.models.wrapper import ModelWrapper

    w = ModelWrapper(NaNNet(tiny_bd.tiny.wrapper.net), tiny_bd.tiny.wrapper.info)
    with pytest.raises(NumericalError, match="NaN"):
        scan(w, tiny_bd.tiny.data, ScanConfig(inversion=SMOKE))
