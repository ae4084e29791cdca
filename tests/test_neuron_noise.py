"""The neuron-noise probe (benchmarks/neuron_noise.py): which parameters carry the noise, that the noise is applied
to the model that is read out, and which way each mode pushes it. What it shows on the zoo is a measurement,
never run here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.neuron_noise import measure, noisy_names, targeted_test, untargeted_cell
from tests.conftest import TinyFiles
from tests.synth import train_tiny


def test_the_noise_sits_on_every_normalisation_gain_and_shift_and_nowhere_else() -> None:
    cnn = train_tiny("bdscan_cnn6", classes=3, size=16, epochs=1, n=48).wrapper
    vit = train_tiny("bdscan_vit", classes=3, size=16, epochs=1, n=48).wrapper
    for w, kind in ((cnn, torch.nn.BatchNorm2d), (vit, torch.nn.LayerNorm)):
        names = noisy_names(w)
        expected = [f"{mn}.{p}" for mn, m in w.named_modules() if isinstance(m, kind) for p in ("weight", "bias")]
        assert names and set(names) == set(expected)
        params = dict(w.named_parameters())
        assert all(n in params for n in names)


def test_without_noise_the_readout_is_the_clean_model(tiny_bd: TinyFiles) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    (un,) = measure(w, data.x, data.y, "untargeted", [0.0], seed=3, steps=2)
    (tg,) = measure(w, data.x, data.y, "targeted", [0.0], seed=3, steps=2)
    perm = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(3))
    xb, yb = data.x[perm[len(perm) // 2:]], data.y[perm[len(perm) // 2:]]
    with torch.no_grad():
        logits = w(xb)
    conf = torch.zeros(10, 10, dtype=torch.long)
    conf.index_put_((yb, logits.argmax(1)), torch.ones_like(yb), accumulate=True)
    assert un["conf"] == conf.tolist()
    # --cross-fit: the detector's cross-fit whatever the number of images; without noise every image is read as is
    (cf,) = measure(w, data.x, data.y, "untargeted", [0.0], seed=3, steps=2, cross_fit=True)
    with torch.no_grad():
        every = torch.zeros(10, 10, dtype=torch.long).index_put_((data.y, w(data.x).argmax(1)), torch.ones_like(data.y),
                                                                 accumulate=True)
    assert cf["conf"] == cf["clean_conf"] == every.tolist()
    (ns,) = measure(w, data.x, data.y, "untargeted", [0.0], seed=3, steps=2, no_split=True)  # --no-split: the same
    assert ns["conf"] == ns["clean_conf"] == every.tolist()
    for t in range(10):
        other = yb != t
        ce = F.cross_entropy(logits[other], torch.full((int(other.sum()),), t))
        assert abs(tg["ce"][t] - float(ce)) < 1e-5
        assert tg["rate"][t] == float((logits[other].argmax(1) == t).float().mean())


def test_untargeted_noise_raises_the_loss_and_targeted_noise_lowers_it(tiny_bd: TinyFiles) -> None:
    w, data = tiny_bd.tiny.wrapper, tiny_bd.tiny.data
    clean, noisy = measure(w, data.x, data.y, "untargeted", [0.0, 0.3], seed=0, steps=5)
    assert noisy["acc"] < clean["acc"]
    t0, t1 = measure(w, data.x, data.y, "targeted", [0.0, 0.3], seed=0, steps=5)
    assert all(b < a for a, b in zip(t0["ce"], t1["ce"], strict=True))
    again = measure(w, data.x, data.y, "untargeted", [0.0, 0.3], seed=0, steps=5)
    assert again[1]["conf"] == noisy["conf"]  # one thread, one seed: the same run


def test_a_collapse_is_read_as_the_class_the_errors_go_to() -> None:
    # three classes of 10 readout images each; the noise sends classes 0 and 1 to class 2
    conf = [[1, 0, 9], [0, 2, 8], [0, 0, 10]]
    top, share, sources = untargeted_cell({"conf": conf})
    assert (top, sources) == (2, 2) and abs(share - 17 / 20) < 1e-6
    st = targeted_test({"ce": [2.0, 2.1, 1.9, 2.05, 0.3, 2.2]})
    assert st.min_label == 4 and st.p_value < 0.01
