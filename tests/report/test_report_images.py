"""Trigger pictures an auditor can see, and sizes in words (issue #27 item 11)."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from bdscan.report.charts import size_words
from bdscan.report.images import decode_data_uri, stretch, trigger_images
from bdscan.trigger import Trigger


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(decode_data_uri(uri))))


def test_a_faint_mask_is_contrast_stretched_in_the_picture_only() -> None:
    mask = torch.zeros(8, 8)
    mask[2:4, 2:4] = 0.3  # a soft reversed mask: 30 % grey at best, nearly black as it is
    t = Trigger(mask, torch.ones(3, 8, 8), 3)
    imgs = trigger_images(t, torch.zeros(3, 8, 8))
    assert _pixels(imgs["mask"]).max() == 255 and _pixels(imgs["mask"]).min() == 0
    assert 75 <= _pixels(imgs["product"]).max() <= 77  # the trigger itself is drawn as it is (0.3 of white)
    assert torch.equal(t.mask, mask) and abs(t.l1() - 1.2) < 1e-6  # the trigger and its size are untouched
    assert torch.equal(stretch(torch.zeros(4, 4)), torch.zeros(4, 4))  # an empty mask stays black


def test_sizes_read_as_areas() -> None:
    doc = {"model": {"input_size": [3, 32, 32], "token_grid": {"grid": [8, 8], "stride": 4, "footprint": 4}},
           "modes": {"patch": {"params": [{"name": "patch", "grid": {"stride": 4, "footprint": 4}}],
                               "labels": [{"label": 3, "param": "patch"}]}, "pixel": {}}}
    assert size_words(doc, "patch", 3, 0.33) == ("0.33 of one 4×4-pixel token, i.e. the area of about 5 pixels at full "
                                                "strength, 0.5% of the 32×32 image")
    assert size_words(doc, "pixel", 3, 29.6) == "the area of about 30 pixels at full strength, 2.9% of the 32×32 image"
    assert size_words(doc, "pixel", 3, None) is None
    cct = json.loads(json.dumps(doc))
    cct["modes"]["patch"]["params"][0]["grid"] = {"stride": 2, "footprint": 3}  # overlapping tokens: no area
    assert "receptive field" in size_words(cct, "patch", 3, 1.5)
