"""The HTML report: content, section order, self-containment and robustness to missing fields."""

from __future__ import annotations

import copy
import html as html_lib
import json
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from bdscan.report.html import num, render_html, render_report_from_dir, safe_image
from tests.conftest import TARGET
from tests.report.scans import as_clean, as_inconclusive, unsafe_doc

SECTIONS = ["Verdict", "Detectors", "Model card", "Norm per class", "Reversed triggers", "Pace of learning", "Activation statistics",
            "Repair", "Configuration and reproducibility"]
#: a document without detector sections (a refused file, an empty document) has no "Detectors" table
NO_DETECTORS = [h for h in SECTIONS if h != "Detectors"]
#: the brief's plain-text checks on the raw HTML (text from the document is escaped, so it cannot match these)
EXTERNAL = [
    re.compile(r"""(src|href)=["']https?:""", re.I),
    re.compile(r"<script", re.I),
    re.compile(r"<link", re.I),
    re.compile(r"@import", re.I),
    re.compile(r"url\(\s*['\"]?\s*(https?:|//)", re.I),
]
ACTIVE_TAGS = {"script", "link", "iframe", "object", "embed", "base", "frame", "applet", "form"}
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "poster", "data", "srcset", "background"}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def assert_self_contained(html: str, text_urls: bool = False) -> None:
    """No external or active content; unless ``text_urls``, no absolute URL at all but the SVG namespace."""
    for rx in EXTERNAL:
        m = rx.search(html)
        assert m is None, f"external/active content {m.group(0)!r} near: {html[max(0, m.start() - 80):m.end() + 80]!r}"
    p = _Tags()
    p.feed(html)
    p.close()
    for tag, attrs in p.tags:
        assert tag not in ACTIVE_TAGS, tag
        for k, v in attrs:
            assert not k.startswith("on"), (tag, k)
            if k in URL_ATTRS:
                assert v is not None and (v.startswith("#") or v.startswith("data:image/png;base64,")), (tag, k, (v or "")[:60])
        if tag == "meta":
            assert "http-equiv" not in dict(attrs), attrs
    if not text_urls:
        for url in re.findall(r"https?://[^\s\"'<>)]+", html):
            assert url == "http://www.w3.org/2000/svg", url
    for src in re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", html):
        assert src.startswith("data:image/png;base64,"), src[:60]


def section(html: str, heading: str) -> str:
    """The text of one <section> (from its <h2> to the next section)."""
    start = html.index(f"<h2>{heading}</h2>")
    end = html.find("</section>", start)
    return html[start:end]


def headings(html: str) -> list[str]:
    return re.findall(r"<h2>([^<]+)</h2>", html)


def test_flagged_report(flagged_doc: dict[str, Any]) -> None:
    assert flagged_doc["verdict"]["status"] == "backdoor", flagged_doc["verdict"]
    assert flagged_doc["verdict"]["target"] == TARGET
    html = render_html(flagged_doc)
    assert headings(html) == SECTIONS
    v = section(html, "Verdict")
    assert "Backdoor suspected" in v
    assert f"<strong>class{TARGET}</strong> (index {TARGET})" in v
    assert "Do not deploy" in v and "bdscan repair bd.safetensors --data" in v
    for mode in ("Pixel level", "Patch level"):  # both anomaly indices side by side
        assert f"{mode} anomaly index" in v
    assert num(flagged_doc["modes"]["pixel"]["anomaly"]["anomaly_index"]) in v
    assert num(flagged_doc["modes"]["patch"]["anomaly"]["anomaly_index"]) in v
    assert "the scan named the right class" in v
    assert_self_contained(html)
    assert "@media print" in html and "@page" in html
    # images: every reversed trigger's 4 images and the original's 3, all inline
    n_imgs = sum(len(t["images"]) for m in flagged_doc["modes"].values() for t in m["triggers"])
    n_imgs += len(flagged_doc["modes"]) * len(flagged_doc["model"]["original_trigger"]["images"])
    # the Detectors table (the default's neuron noise is "not applicable" on this CNN, and listed) repeats the
    # deciding level's smallest trigger (4 images) and its null chart
    assert [d["detector"] for d in flagged_doc["verdict"]["evidence"]] == ["neural-cleanse", "neuron-noise"]
    assert html.count('<img src="data:image/png;base64,') == n_imgs + 4
    # charts: one norm chart per mode + 3 phase charts per mode + the layer chart + the Detectors table's null chart
    assert html.count("<svg ") == 2 + 2 * 3 + 1 + 1
    assert "not applicable" in section(html, "Detectors").lower()
    assert '<a href="#detectors">Detectors</a>' in html  # the table of contents names it too
    t = section(html, "Reversed triggers")
    assert "Original trigger" in t and "distance to original" in t and "badnets" in t
    a = section(html, "Activation statistics")
    assert "Precision@k" in a and "phase 1" in a and "final trigger" in a and "not computed" not in a
    assert "No repair was run" in section(html, "Repair")
    c = section(html, "Configuration and reproducibility")
    assert "Seed" in c and flagged_doc["versions"]["torch"] in c and "total_s" in c


def test_clean_report(flagged_doc: dict[str, Any]) -> None:
    html = render_html(as_clean(flagged_doc))
    v = section(html, "Verdict")
    assert "No backdoor found" in v and "Backdoor suspected" not in v
    assert "does not prove" in v  # what clean does not guarantee
    assert "Suspected target" not in v
    assert headings(html) == SECTIONS
    assert_self_contained(html)


def test_inconclusive_report(flagged_doc: dict[str, Any]) -> None:
    doc = as_inconclusive(flagged_doc)
    html = render_html(doc)
    v = section(html, "Verdict")
    assert "Inconclusive" in v and "larger budget" in v
    assert "inconclusive: too few classes reached" in v
    n = section(html, "Norm per class")
    assert "Never reached" in n and "✕" in n and "fewer than 3 classes" in n
    assert "were not computed" in section(html, "Activation statistics")
    assert_self_contained(html)


def test_pixel_only_scan_without_original_trigger(pixel_only_doc: dict[str, Any]) -> None:
    assert list(pixel_only_doc["modes"]) == ["pixel"]
    assert pixel_only_doc["model"]["original_trigger"] is None
    html = render_html(pixel_only_doc)
    assert headings(html) == SECTIONS
    assert "Patch level" not in html
    assert "Pixel level anomaly index" in section(html, "Verdict")
    t = section(html, "Reversed triggers")
    assert "Original trigger" not in t and "distance to original" not in t
    assert "were not computed" in section(html, "Activation statistics")
    assert html.count("<svg ") == 1 + 3 + 1  # and the Detectors table's null chart
    assert_self_contained(html)


def test_unsafe_minimal_document() -> None:
    """The CLI's document for a refused pickle file has no modes, config or classes; it still renders."""
    html = render_html(unsafe_doc())
    assert headings(html) == NO_DETECTORS
    v = section(html, "Verdict")
    assert "Unsafe file" in v and "torch.load" in v
    m = section(html, "Model card")
    assert "os.system" in m and "builtins.exec" in m and "dangerous" in m
    assert_self_contained(html)


def test_empty_document_renders() -> None:
    html = render_html({})
    assert headings(html) == NO_DETECTORS and "Inconclusive" in html
    assert_self_contained(html)


def test_repair_section_of_an_older_document(flagged_doc: dict[str, Any]) -> None:
    """A document written before repairs had intervals and checks still renders, judged by its tolerance alone."""
    doc = copy.deepcopy(flagged_doc)
    doc["repair"] = {"method": "unlearn", "acc_drop": 0.02, "tolerance": 0.03, "within_tolerance": True,
                     "before": {"clean_accuracy": 0.95, "asr_reversed": 1.0, "asr_original": 0.99},
                     "after": {"clean_accuracy": 0.93, "asr_reversed": 0.02, "asr_original": 0.04}}
    r = section(render_html(doc), "Repair")
    for text in ("Clean accuracy", "95.0 %", "93.0 %", "Attack success of the trigger used", "2.0 %",
                 "Attack success of the original trigger", "99.0 %", "4.0 %", "unlearning", "PASSED", "no interval recorded",
                 "written before bdscan recorded intervals"):
        assert text in r, text
    assert "No repair was run" not in r and "{" not in r.split("<details>")[0]  # no JSON blob in the page itself


def repair_doc(flagged_doc: dict[str, Any], passed: bool, written: bool, forced: bool) -> dict[str, Any]:
    doc = copy.deepcopy(flagged_doc)
    img = "data:image/png;base64,iVBORw0KGgo="
    doc["repair"] = {
        "method": "unlearn", "trigger": {"kind": "reversed-pixel", "target": TARGET, "label": TARGET, "l1": 9.2,
                                         "images": {"mask": img, "pattern": img, "product": img, "stamped": img}},
        "before": {"clean_accuracy": 0.5, "asr_reversed": 0.9, "asr_original": 1.0, "target_without_trigger": 0.02},
        "after": {"clean_accuracy": 0.48, "asr_reversed": 0.02, "asr_original": 0.3 if not passed else 0.04,
                  "target_without_trigger": 0.02},
        "intervals": {"confidence": 0.95, "acc_drop": [-0.04, 0.09],
                      "before": {"clean_accuracy": [0.38, 0.62], "asr_reversed": [0.8, 0.96]},
                      "after": {"clean_accuracy": [0.36, 0.6], "asr_reversed": [0.0, 0.1]}},
        "counts": {"clean": 60, "lost": 3, "gained": 2, "attack": 54}, "acc_drop": 0.02, "tolerance": 0.03,
        "within_tolerance": True, "max_asr": 0.1, "backdoor_removed": passed, "passed": passed,
        "checks": [{"check": "clean accuracy", "passed": True, "text": "Passes: clean accuracy dropped 1.7 points."},
                   {"check": "attack success", "passed": passed, "text": "Passes: fine." if passed else "Fails: the backdoor still works."}],
        "config": {"targets": "model", "epochs": 8, "lr": 0.001, "stamp_fraction": 0.5}, "holdout_images": 60,
        "repair_images": 140, "seconds": 4.2, "details": {"loss": [0.5, 0.4]},
        "export": {"file": "bd-repaired.safetensors", "written": written, "forced": forced, "refused": not written},
    }
    doc["invocation"] = {"model": "models/bd.safetensors", "data": "data/clean.npz", "scan_folder": "scan-out", "load_args": []}
    return doc


def test_repair_page_an_auditor_reads(flagged_doc: dict[str, Any]) -> None:
    html = render_html(repair_doc(flagged_doc, passed=True, written=True, forced=False))
    r = section(html, "Repair")
    for text in ("PASSED", "written to bd-repaired.safetensors", "Clean accuracy", "50.0 %", "48.0 %", "38.0 % – 62.0 %",
                 "-4.0 % – 9.0 %", "-2.0", "✓", "Attack success of the trigger used", "Sent to the target with no trigger",
                 "The trigger the repair removed", "reversed by the scan at the pixel level", "mask (contrast-stretched)",
                 "stamped image", "How it was judged", "whole 95 % interval of the drop", "the input model&#39;s own answer"):
        assert text in r, text
    assert r.count("<img") == 4
    v = section(html, "Verdict")
    # the verdict box no longer tells the reader to run the repair that ran; it says how to check the repaired model
    assert "bdscan repair" not in v and "A repair ran and passed its checks" in v
    assert "bdscan scan bd-repaired.safetensors --data data/clean.npz --report bd-repaired-scan.html" in v
    assert_self_contained(html)


def test_a_failed_repair_and_a_forced_export_are_marked(flagged_doc: dict[str, Any]) -> None:
    r = section(render_html(repair_doc(flagged_doc, passed=False, written=False, forced=False)), "Repair")
    assert "FAILED" in r and "Repair failed its attack success check" in r and "✗" in r and "was not written" in r
    html = render_html(repair_doc(flagged_doc, passed=False, written=True, forced=True))
    r = section(html, "Repair")
    assert "FORCED EXPORT" in r and "--force" in r and "do not treat it as repaired" in r
    assert "written with --force" in section(html, "Verdict")


def test_the_suggested_repair_command_is_complete(flagged_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(flagged_doc)
    doc["invocation"] = {"model": "my models/bd.safetensors", "data": "data/clean.npz", "scan_folder": "out dir",
                         "load_args": ["--arch", "bdscan_cnn6"]}
    v = html_lib.unescape(section(render_html(doc), "Verdict"))
    assert ("bdscan repair 'my models/bd.safetensors' --data data/clean.npz --scan 'out dir' --arch bdscan_cnn6 "
            "--out bd-repaired.safetensors --report bd-repair.html") in v


def test_activations_failed_and_absent(flagged_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(flagged_doc)
    doc["activations"] = {"computed": False, "reason": "cannot attach forward hooks to this model"}
    assert "cannot attach forward hooks" in section(render_html(doc), "Activation statistics")
    del doc["activations"]
    assert "were not computed" in section(render_html(doc), "Activation statistics")


def test_hostile_document_is_escaped_and_never_links_out(flagged_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(flagged_doc)
    doc["model"]["class_names"][TARGET] = '<script>alert("x")</script>'
    doc["verdict"]["target_name"] = '<img src=x onerror=alert(1)>'
    doc["model"]["file"] = 'a"><link rel=stylesheet href="https://evil.example/x.css">'
    doc["modes"]["pixel"]["triggers"][0]["images"]["mask"] = "https://evil.example/track.png"
    doc["modes"]["pixel"]["triggers"][0]["images"]["pattern"] = "javascript:alert(1)"
    doc["data"]["source"] = "$(rm -rf ~)"
    html = render_html(doc)
    assert_self_contained(html, text_urls=True)  # the hostile file name is shown as (escaped) text
    assert "evil.example/track.png" not in html and "javascript:" not in html
    assert "&lt;script&gt;" in html
    assert "rm -rf" not in section(html, "Verdict")  # not pasted into the suggested command


def test_failed_labels_and_infinite_index(flagged_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(flagged_doc)
    m = doc["modes"]["pixel"]
    r = next(r for r in m["labels"] if r["label"] != TARGET)
    r.update(norm=None, succeeded=False)
    m["anomaly"]["failed"] = [r["label"]]
    m["anomaly"]["anomaly_index"] = 1e9
    html = render_html(doc)
    assert f"Never reached (✕): class{r['label']} ({r['label']})" in section(html, "Norm per class")
    assert "∞" in section(html, "Verdict")


def test_deterministic_and_from_dir(flagged_doc: dict[str, Any], tmp_path) -> None:  # type: ignore[no-untyped-def]
    html = render_html(flagged_doc)
    assert render_html(copy.deepcopy(flagged_doc)) == html
    (tmp_path / "scan.json").write_text(json.dumps(flagged_doc), encoding="utf-8")
    assert render_report_from_dir(tmp_path) == html
    assert render_report_from_dir(str(tmp_path)) == html


@pytest.mark.parametrize("uri,ok", [("data:image/png;base64,iVBORw0KGgo=", True), ("https://x/y.png", False),
                                    ("data:text/html;base64,PGI+", False), ("data:image/png;base64,<x>", False), (None, False)])
def test_safe_image(uri: Any, ok: bool) -> None:
    assert (safe_image(uri) is not None) is ok



def test_the_verdict_explains_a_two_look_correction(flagged_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(flagged_doc)
    assert "two-look" not in render_html(doc)  # one look: nothing to explain
    doc["config"]["second_look"] = {"first_steps": 30, "alpha_first": 0.02, "clean_above": 0.5}
    doc["config"]["alpha"] = 0.05
    doc["config"]["inversion"]["steps"] = 90
    doc["verdict"]["looks"] = 1
    text = html_lib.unescape(render_html(doc))
    assert "then by 2.5 for the two-look schedule: this verdict is its first look's, after 30 of 90 steps" in text
    doc["verdict"]["looks"] = 2
    text = html_lib.unescape(render_html(doc))
    assert "then by 1.67 for the two-look schedule: the first look, after 30 steps, was in doubt" in text
