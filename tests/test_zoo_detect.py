"""The evaluation-zoo detection benchmark's bookkeeping (benchmarks/zoo_detect.py): what counts as found, a false
alarm, the AUC and seed agreement. The scans themselves are measurements and never run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdscan.detect.anomaly import LOG_SD_FLOOR
from benchmarks.common import anomaly
from benchmarks.zoo_detect import (
    auc,
    groups,
    levels_at,
    levels_trajectory,
    matrix,
    parse_combo,
    parse_floor,
    per_seed,
    recorded_rows,
    recorded_schedule,
    replay,
    replay_as_run,
    replayable,
    row_of,
    same_verdict,
    seed_flips,
    seed_noise,
    select,
    split_stale,
    summary,
    two_look,
)


def _doc(status: str, target: int | None, p: float | None, nc_p: float | None = None, mm_p: float | None = None) -> dict:
    ev = [{"detector": "neural-cleanse", "status": status, "target": target, "p_value": nc_p},
          {"detector": "mm-bd", "status": "clean", "target": 7, "p_value": mm_p}]
    return {"verdict": {"status": status, "target": target, "p_value": p, "decided_by": {"detector": "neural-cleanse"},
                        "evidence": ev}, "timings": {"total_s": 12.5, "pixel_s": 6.0, "mm-bd_s": 4.0},
            "modes": {"pixel": {"anomaly": {"p_value": 0.2, "min_label": 9}}}}


def _entry(name: str, target: int | None, arch: str = "bdscan_vit", attack: str | None = "badnets_small") -> dict:
    return {"name": name, "arch": arch, "dataset": "gtsrb", "attack": attack if target is not None else None,
            "split": "calibration", "target": target}


def test_a_backdoor_counts_as_found_only_with_its_true_target() -> None:
    right = row_of(_entry("a", 3), _doc("backdoor", 3, 0.001, 0.0005), seed=0, wall=13.0)
    wrong = row_of(_entry("b", 3), _doc("backdoor", 5, 0.001), seed=0, wall=13.0)
    missed = row_of(_entry("c", 3), _doc("clean", None, 0.4), seed=0, wall=13.0)
    assert (right["right"], wrong["right"], missed["right"]) == (True, False, False)
    assert wrong["flagged"] and not missed["flagged"]
    assert right["evidence"]["neural-cleanse"] == {"status": "backdoor", "target": 3, "p": 0.0005, "weight": 1.0}
    assert right["evidence"]["mm-bd"]["target"] == 7
    assert right["levels"] == {"pixel": {"p": 0.2, "min_label": 9}}  # the level's smallest class even when not flagged
    assert right["detector_seconds"] == {"pixel_s": 6.0, "mm-bd_s": 4.0}
    s = summary([right, wrong, missed])
    assert s["tpr"] == 1 / 3 and s["flagged_any_class"] == 2 / 3 and s["fpr"] is None


def test_a_flagged_clean_model_is_a_false_alarm() -> None:
    rows = [row_of(_entry("c1", None), _doc("backdoor", 2, 0.01), 0, 1.0),
            row_of(_entry("c2", None), _doc("clean", None, 0.5), 0, 1.0),
            row_of(_entry("c3", None), _doc("inconclusive", None, None), 0, 1.0)]
    assert [r["right"] for r in rows] == [False, True, True]
    assert summary(rows)["fpr"] == 1 / 3


def test_auc_ranks_backdoors_by_smaller_p_and_counts_ties_half() -> None:
    bd = [row_of(_entry(f"b{i}", 1), _doc("backdoor", 1, p), 0, 1.0) for i, p in enumerate((0.001, 0.2))]
    cl = [row_of(_entry(f"c{i}", None), _doc("clean", None, p), 0, 1.0) for i, p in enumerate((0.2, 0.9))]
    # pairs: (0.001 < 0.2) 1, (0.001 < 0.9) 1, (0.2 = 0.2) 0.5, (0.2 < 0.9) 1
    assert auc(bd + cl) == 3.5 / 4
    assert auc(bd) is None
    # a missing p (no calibrated detector) ranks as p = 1
    none = row_of(_entry("c9", None), _doc("inconclusive", None, None), 0, 1.0)
    assert auc([*bd[:1], none]) == 1.0


def test_same_verdict_needs_the_same_status_and_class_under_every_seed() -> None:
    rows = [row_of(_entry("a", 3), _doc("backdoor", 3, 0.01), s, 1.0) for s in (0, 1, 2)]
    rows += [row_of(_entry("b", 3), _doc("backdoor", 3, 0.01), 0, 1.0), row_of(_entry("b", 3), _doc("backdoor", 4, 0.01), 1, 1.0)]
    rows += [row_of(_entry("c", 3), _doc("clean", None, 0.3), 0, 1.0), row_of(_entry("c", 3), _doc("backdoor", 3, 0.01), 1, 1.0)]
    rows += [row_of(_entry("d", 3), _doc("clean", None, 0.3), 0, 1.0)]  # one seed only: not counted
    assert same_verdict(rows) == (1, 3)


def test_groups_put_the_clean_twins_beside_every_attack_kind() -> None:
    rows = [row_of(_entry("a", 3, attack="blended"), _doc("backdoor", 3, 0.01), 0, 1.0),
            row_of(_entry("b", 3, arch="bdscan_cnn6", attack="sig"), _doc("clean", None, 0.3), 0, 1.0),
            row_of(_entry("c", None), _doc("clean", None, 0.3), 0, 1.0)]
    g = groups(rows)
    assert [r["model"] for r in g["attack blended"]] == ["a", "c"]
    assert [r["model"] for r in g["attack sig"]] == ["b", "c"]
    assert len(g["all"]) == 3 and len(g["data gtsrb"]) == 3
    assert {k for k in g if k.startswith("family")} == {"family " + n for n in _family_names(rows)}


def _family_names(rows: list[dict]) -> set[str]:
    from benchmarks.common import BDSCAN_ARCHS

    return {BDSCAN_ARCHS.get(r["arch"], r["arch"]) for r in rows}


def test_only_built_rows_of_the_half_with_a_working_backdoor_are_scanned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import argparse

    for n in ("a", "b", "c", "d"):
        (tmp_path / f"{n}.safetensors").write_bytes(b"x")
    rows = [{"name": "a", "file": "a.safetensors", "split": "calibration", "cell": "gtsrb_vit", "attack": "sig", "asr": 0.95, "sha256": "1"},
            {"name": "b", "file": "b.safetensors", "split": "calibration", "cell": "gtsrb_vit", "attack": "wanet", "asr": 0.06, "sha256": "2"},
            {"name": "c", "file": "c.safetensors", "split": "calibration", "cell": "gtsrb_vit", "attack": None, "asr": None, "sha256": "3"},
            {"name": "d", "file": "d.safetensors", "split": "evaluation", "cell": "gtsrb_vit", "attack": None, "asr": None, "sha256": "4"},
            {"name": "e", "file": "e.safetensors", "split": "calibration", "cell": "gtsrb_vit", "attack": None, "asr": None, "sha256": None}]
    args = argparse.Namespace(split="calibration", only=None, cell=None)
    assert [e["name"] for e in select(rows, args, tmp_path)] == ["a", "c"]
    args.cell = ["gtsrb_cnn6"]
    assert select(rows, args, tmp_path) == []


def _rec(target: int | None, levels: dict[str, tuple[float | None, int]], mm: tuple[float, int] | None = None) -> dict:
    """A recorded row with these level p-values (p, smallest class) and MM-BD's (p, class)."""
    ev = {"mm-bd": {"status": "clean", "target": mm[1], "p": mm[0]}} if mm else {}
    return {"model": "m", "seed": 0, "true_target": target, "levels": {k: {"p": p, "min_label": c} for k, (p, c) in levels.items()},
            "evidence": ev, "status": "clean", "suspect": None, "p": 1.0, "flagged": False, "right": False}


def test_replay_applies_the_scans_nested_correction() -> None:
    row = _rec(4, {"pixel": (0.03, 4), "patch": (0.2, 6), "blend": (0.012, 4)}, mm=(0.5, 1))
    # Neural Cleanse over two levels: 2 × 0.03 = 0.06 > 0.05, not flagged; the blend level makes it 3 × 0.012 = 0.036
    assert replay(row, ("pixel", "patch"), (), 0.05)["p"] == pytest.approx(0.06)
    assert not replay(row, ("pixel", "patch"), (), 0.05)["flagged"]
    r = replay(row, ("pixel", "patch", "blend"), (), 0.05)
    assert r["p"] == pytest.approx(0.036) and r["flagged"] and r["suspect"] == 4 and r["right"] and r["decided_by"] == "neural-cleanse"
    # a second detector doubles it: 2 × min(0.036, 0.5) = 0.072
    r = replay(row, ("pixel", "patch", "blend"), ("mm-bd",), 0.05)
    assert r["p"] == pytest.approx(0.072) and not r["flagged"] and r["suspect"] is None and not r["right"]
    # MM-BD alone decides with its own class
    r = replay(_rec(1, {"pixel": (0.9, 3)}, mm=(0.001, 1)), ("pixel",), ("mm-bd",), 0.05)
    assert r["flagged"] and r["suspect"] == 1 and r["decided_by"] == "mm-bd" and r["right"]


def test_replay_leaves_out_what_did_not_run_and_counts_a_clean_flag_as_a_false_alarm() -> None:
    row = _rec(None, {"pixel": (0.01, 2), "patch": (None, 0)})  # an inconclusive patch level: not counted
    r = replay(row, ("pixel", "patch", "blend"), ("mm-bd",), 0.05)
    assert r["p"] == pytest.approx(0.01) and r["flagged"] and not r["right"]
    r = replay(row, (), ("mm-bd",), 0.05)
    assert r["status"] == "inconclusive" and not r["flagged"] and r["right"]


def test_parse_combo_splits_levels_from_detectors() -> None:
    assert parse_combo("pixel, blend,mm-bd") == (("pixel", "blend"), ("mm-bd",))
    assert parse_combo("mm-bd") == ((), ("mm-bd",))


@pytest.mark.parametrize("combo", ["pixel,patch:neural-cleanse", "pixel,neural-cleanse", "pixl,patch", "mmbd"])
def test_parse_combo_refuses_what_is_neither_a_level_nor_a_detector(combo: str) -> None:
    with pytest.raises(SystemExit, match="neither a Neural Cleanse level"):
        parse_combo(combo)


def test_a_row_recorded_without_its_levels_replays_only_the_default_levels() -> None:
    old = {"model": "m", "seed": 0, "true_target": 3, "evidence": {"neural-cleanse": {"status": "backdoor", "target": 3, "p": 0.01},
                                                                   "mm-bd": {"status": "clean", "target": 3, "p": 0.3}}}
    assert replayable(old, ("pixel", "patch")) and replayable(old, ()) and not replayable(old, ("pixel", "patch", "blend"))
    r = replay(old, ("patch", "pixel"), ("mm-bd",), 0.05)
    assert r["p"] == pytest.approx(0.02) and r["right"]


def _histories(final: dict[int, float], steps: int, late: int | None = None) -> list[dict]:
    """Label histories whose best size falls linearly to ``final``; label ``late`` first succeeds at step 3."""
    out = []
    for lab, size in final.items():
        h = [size * (1 + 2 * (steps - 1 - i) / steps) for i in range(steps)]
        if lab == late:
            h[:2] = [None, None]
        out.append({"label": lab, "norm": size, "history": h})
    return out


def test_rows_keep_every_steps_sizes_and_replay_a_shorter_schedule() -> None:
    final = {0: 40.0, 1: 52.0, 2: 61.0, 3: 12.0, 4: 70.0, 5: 45.0}
    doc = _doc("backdoor", 3, 0.001)
    doc["modes"] = {"pixel": {"anomaly": {"p_value": anomaly(final).p_value, "min_label": 3},
                              "labels": _histories(final, 10, late=4)}}
    row = row_of(_entry("a", 3), doc, seed=0, wall=1.0)
    assert len(row["sizes"]["pixel"]["3"]) == 10 and row["sizes"]["pixel"]["4"][:2] == [None, None]
    # stopped after the last step: what the scan itself said
    assert levels_at(row, 10)["pixel"] == {"p": pytest.approx(row["levels"]["pixel"]["p"], rel=1e-4), "min_label": 3}
    # stopped after 2 steps: class 4 had not succeeded yet, so it is left out as a failed class is
    early = levels_at(row, 2)["pixel"]
    sizes2 = {int(k): h[1] for k, h in row["sizes"]["pixel"].items()}
    assert early["p"] == pytest.approx(anomaly(sizes2).p_value, rel=1e-4) and early["p"] != levels_at(row, 10)["pixel"]["p"]
    assert levels_at(row, 11) is None  # not recorded that long
    assert levels_at(row_of(_entry("b", 3), _doc("clean", None, 0.4), 0, 1.0), 2) is None  # no label histories


def _converging_row(target_final: float, name: str = "m", target: int | None = 3) -> dict:
    """A pixel-only row over 4 steps: every class's size halves by the last step, except class 3's, which reaches
    ``target_final`` (from the others' range at step 1)."""
    others = {0: 60.0, 1: 52.0, 2: 70.0, 4: 66.0, 5: 58.0, 6: 75.0, 7: 63.0, 8: 55.0, 9: 68.0}
    labels = [{"label": k, "norm": v / 2, "history": [v, v * 0.8, v * 0.6, v / 2]} for k, v in others.items()]
    labels.append({"label": 3, "norm": target_final, "history": [45.0, 40.0, 30.0, target_final]})
    doc = _doc("clean", None, 0.5)
    doc["modes"] = {"pixel": {"anomaly": {"p_value": 0.5, "min_label": 3}, "labels": labels}}
    return row_of(_entry(name, target), doc, seed=0, wall=1.0)


def test_two_look_flags_early_stops_clean_or_looks_again_within_alpha() -> None:
    row = _converging_row(8.0)
    p1 = replay(row | {"levels": levels_at(row, 1)}, ("pixel",), (), 0.05)["p"]
    p4 = replay(row | {"levels": levels_at(row, 4)}, ("pixel",), (), 0.05)["p"]
    assert p4 < 0.001 < 0.05 < p1 < 0.9  # borderline after one step, clear after four
    second = two_look(row, 1, 4, 0.005, 0.9, 0.05, ("pixel",), ())
    assert second["looks"] == 2 and second["steps_run"] == 4 and second["flagged"] and second["right"] and second["suspect"] == 3
    stopped = two_look(row, 1, 4, 0.005, p1 / 2, 0.05, ("pixel",), ())  # p1 above C: clean after the first look
    assert stopped["looks"] == 1 and stopped["steps_run"] == 1 and not stopped["flagged"] and not stopped["right"]
    early = two_look(row, 4, 4, 0.005, 0.9, 0.05, ("pixel",), ())  # flagged at the first look already (p <= A1)
    assert early["looks"] == 1 and early["flagged"]
    assert two_look(row, 1, 5, 0.005, 0.9, 0.05, ("pixel",), ()) is None  # in doubt, and not recorded for 5 steps
    # a default run's row stops at its first look: a scan decided there replays without the second look's steps
    decided = two_look(row, 1, 5, 0.005, p1 / 2, 0.05, ("pixel",), ())
    assert decided is not None and decided["looks"] == 1 and not decided["flagged"]
    assert two_look(row, 5, 6, 0.005, 0.9, 0.05, ("pixel",), ()) is None  # not even the first look recorded


def test_a_recording_run_looks_once_and_the_table_counts_second_looks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import benchmarks.zoo_detect as zd

    seen: list[list[str]] = []
    monkeypatch.setattr(zd, "scan_cli", lambda args, threads: seen.append(list(args)) or ({}, 0.0))
    zd.scan_one(Path("m.safetensors"), Path("d.npz"), "neural-cleanse", "fast", 90, 0, 0.05, 1)
    zd.scan_one(Path("m.safetensors"), Path("d.npz"), "neural-cleanse", "fast", None, 0, 0.05, 1)
    # --steps records every class's sizes up to those steps: a second look that stopped early would cut them short
    assert seen[0][seen[0].index("--steps"):][:4] == ["--steps", "90", "--second-look", "off"]
    assert "--second-look" not in seen[1] and "--steps" not in seen[1]  # as users scan: the budget's own schedule
    doc = _doc("backdoor", 3, 0.01)
    doc["verdict"]["looks"] = 2
    rows = [row_of({"name": "a", "arch": "x", "dataset": "d", "target": 3}, doc, 0, 1.0),
            row_of({"name": "b", "arch": "x", "dataset": "d", "target": None}, _doc("clean", None, 0.6), 0, 1.0)]
    s = summary(rows)
    assert rows[0]["looks"] == 2 and rows[1]["looks"] is None and (s["second_looks"], s["looks_known"]) == (1, 1)


def test_summary_prints_the_recorded_verdicts_without_scanning(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    import benchmarks.zoo_detect as zd

    monkeypatch.setattr(zd, "scan_cli", lambda *a: pytest.fail("--summary must not scan"))
    rows = [row_of(_entry("vit_bd", 3), _doc("backdoor", 3, 0.01), s, 1.0) for s in (0, 1)]
    rows += [row_of(_entry("vit_clean", None), _doc("backdoor", 5, 0.02), 0, 1.0)]  # a false alarm
    out = tmp_path / "zoo.json"
    out.write_text(json.dumps({"key": {"detectors": "neural-cleanse", "split": "evaluation"}, "when": "now", "rows": rows}))
    zd.run(zd.parser().parse_args(["--split", "evaluation", "--out", str(out), "--summary", "--seeds", "0,1"]))
    text = capsys.readouterr().out
    assert "3 scans" in text and "| vit_clean | clean | 0 | backdoor 5 |" in text
    # the backdoor found under both seeds; the clean twin flagged: FPR 100 %
    assert "| all | 2 | 1 | 100 % | 100 % | 100 % |" in text
    zd.run(zd.parser().parse_args(["--split", "evaluation", "--out", str(out), "--summary", "--seeds", "1"]))
    assert "(1 scans" in capsys.readouterr().out


def test_replay_judges_a_two_look_recording_by_its_own_schedule() -> None:
    # the budget's schedule unless --steps turned the second look off
    s1, s2, a1, c = recorded_schedule({"key": {"budget": "fast", "steps": None}}, 0.05)
    assert (s1, s2, c) == (30, 90, 0.5) and a1 == pytest.approx(0.4 * 0.05)
    assert recorded_schedule({"key": {"budget": "fast", "steps": 90}}, 0.05) is None
    row = _converging_row(8.0) | {"looks": 2}
    p1 = replay(row | {"levels": levels_at(row, 1)}, ("pixel",), (), 0.05)["p"]
    schedule = (1, 4, 0.005, 0.9)
    judged = replay_as_run(row, ("pixel",), (), 0.05, schedule)
    assert judged == two_look(row, 1, 4, 0.005, 0.9, 0.05, ("pixel",), ())
    assert judged["looks"] == 2 and judged["flagged"]
    # the second look's correction is in its p-value: a one-look replay of the same final sizes reports less
    assert judged["p"] > replay(row | {"levels": levels_at(row, 4)}, ("pixel",), (), 0.05)["p"]
    assert replay_as_run(row, ("pixel",), (), 0.05, (1, 5, 0.005, 0.9)) is None  # in doubt, and 5 steps not recorded
    assert replay_as_run(row, ("pixel",), (), 0.05, (1, 5, 0.005, p1 / 2))["looks"] == 1  # clean at the first look
    # a one-look recording (or a row from before rows kept their sizes) replays as before
    assert replay_as_run(row, ("pixel",), (), 0.05, None) == replay(row, ("pixel",), (), 0.05)
    assert replay_as_run(row | {"sizes": {}}, ("pixel",), (), 0.05, schedule) == replay(row | {"sizes": {}}, ("pixel",), (), 0.05)


def test_the_matrix_counts_each_cells_kinds_and_its_clean_flags() -> None:
    rows = [row_of(_entry("a", 3, attack="blended"), _doc("backdoor", 3, 0.01), 0, 1.0),  # found
            row_of(_entry("a", 3, attack="blended"), _doc("backdoor", 5, 0.01), 1, 1.0),  # wrong class: not found
            row_of(_entry("b", 3, arch="bdscan_cnn6", attack="sig"), _doc("clean", None, 0.3), 0, 1.0),
            row_of(_entry("c", None), _doc("backdoor", 2, 0.01), 0, 1.0),  # a false alarm
            row_of(_entry("d", None), _doc("clean", None, 0.3), 0, 1.0)]
    m = matrix(rows)
    assert len(m) == 2
    vit = next(v for k, v in m.items() if k.startswith("gtsrb") and "sig" not in v)
    cnn = next(v for k, v in m.items() if "sig" in v)
    assert vit == {"blended": (1, 2), "clean": (1, 2)}
    assert cnn == {"sig": (0, 1)}  # no clean model of that cell scanned: no clean column


def test_a_scan_of_a_model_rebuilt_or_reset_since_is_left_out_of_the_tables() -> None:
    rows = [{"model": "a", "sha16": "1" * 16}, {"model": "b", "sha16": "2" * 16}, {"model": "c", "sha16": "3" * 16},
            {"model": "d"}]  # recorded before rows kept their digest
    manifest = [{"name": "a", "sha256": "1" * 64}, {"name": "b", "sha256": "9" * 64}, {"name": "c", "sha256": None},
                {"name": "d", "sha256": "4" * 64}]
    current, stale = split_stale(rows, manifest)
    assert [r["model"] for r in current] == ["a", "d"] and [r["model"] for r in stale] == ["b", "c"]


def test_recordings_given_with_also_join_out_each_under_its_own_key(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from benchmarks.zoo_detect import parser

    def rec(name: str, sha: str, seed: int = 0) -> dict:
        return _converging_row(8.0, name=name) | {"seed": seed, "sha16": sha * 16}

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"name": "a", "sha256": "1" * 64}, {"name": "b", "sha256": "2" * 64}]))
    two_looks, one_look = {"budget": "fast", "steps": None}, {"budget": "fast", "steps": 90}
    out, also = tmp_path / "default.json", tmp_path / "steps90.json"
    # --out holds a and a scan of b's previous build; the other recording holds a (again), b's current build and seed 1
    out.write_text(json.dumps({"key": two_looks, "rows": [rec("a", "1") | {"looks": 2}, rec("b", "9")]}))
    also.write_text(json.dumps({"key": one_look, "rows": [rec("a", "1"), rec("b", "2"), rec("b", "2", seed=1)]}))
    args = parser().parse_args(["--split", "calibration", "--out", str(out), "--also", str(also), "--manifest",
                                str(manifest), "--seeds", "0"])
    doc, rows = recorded_rows(args, "--replay")
    assert doc["key"] == two_looks
    assert [(r["model"], r["recorded_in"], r["recorded_key"]) for r in rows] == [("a", str(out), two_looks),
                                                                                 ("b", str(also), one_look)]
    text = capsys.readouterr().out
    assert "left out: their models were rebuilt or reset since: b" in text and f"{also} (1 scans" in text
    # --replay judges each row under its recording's schedule: a's by the budget's two looks (30 and 90 steps, which
    # its 4 recorded steps cannot replay: left out), b's by one look (its recorded p-values)
    from benchmarks.zoo_detect import run

    run(parser().parse_args(["--split", "calibration", "--out", str(out), "--also", str(also), "--manifest", str(manifest),
                             "--seeds", "0", "--replay", "pixel"]))
    text = capsys.readouterr().out
    assert "(1 scans left out: they would need a second look that was not recorded)" in text
    assert "| all | 1 | 0 | 0 % |" in text  # judged (its recorded p-value, 0.5, flags nothing)
    with pytest.raises(SystemExit, match="no recorded scans in"):
        recorded_rows(parser().parse_args(["--split", "calibration", "--out", str(out), "--also", str(tmp_path / "none.json")]),
                      "--replay")


def test_per_seed_counts_each_run_apart_and_seed_flips_names_the_models_the_seed_changes() -> None:
    rows = [row_of(_entry("a", 3), _doc("backdoor", 3, 0.01), s, 1.0) for s in (0, 1, 2)]  # found under every seed
    rows += [row_of(_entry("b", 3, arch="bdscan_cnn6"), _doc("backdoor", 3, 0.01), 0, 1.0),
             row_of(_entry("b", 3, arch="bdscan_cnn6"), _doc("clean", None, 0.6), 1, 1.0)]  # missed under seed 1
    rows += [row_of(_entry("c", None), _doc("clean", None, 0.7), s, 1.0) for s in (0, 1)]
    rows += [row_of(_entry("c", None), _doc("backdoor", 5, 0.01), 2, 1.0)]  # a false alarm under seed 2 only
    rows += [row_of(_entry("d", 4), _doc("backdoor", 4, 0.01), 0, 1.0), row_of(_entry("d", 4), _doc("backdoor", 6, 0.01), 1, 1.0)]
    by = per_seed(rows)
    assert by["all"][0] == {"found": 3, "backdoored": 3, "clean_flagged": 0, "clean": 1}
    assert by["all"][1] == {"found": 1, "backdoored": 3, "clean_flagged": 0, "clean": 1}
    assert by["all"][2] == {"found": 1, "backdoored": 1, "clean_flagged": 1, "clean": 1}
    assert not any(k.startswith("attack ") for k in by)  # kinds pool every family's clean twins; not a per-run target
    # a flip is a change of status or of the suspected class; a model scanned once, or the same everywhere, is not one
    flips = seed_flips(rows)
    assert [m for m, _ in flips] == ["b", "c", "d"]
    assert [r["seed"] for r in flips[0][1]] == [0, 1]


def test_also_is_refused_by_a_scanning_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import benchmarks.zoo_detect as zd

    monkeypatch.setattr(zd, "scan_one", lambda *a: pytest.fail("a refused run must not scan"))
    args = zd.parser().parse_args(["--split", "evaluation", "--out", str(tmp_path / "o.json"), "--also", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--also joins recordings for --summary and the replays only"):
        zd.run(args)
    assert not (tmp_path / "o.json").exists()


def test_the_trajectory_statistic_scores_a_class_reached_early_though_the_others_catch_up() -> None:
    import math

    # class 3 is at 12 from step 2 on; the others fall from 500 to 13-20 by step 10: the final sizes barely single it
    # out, the mean over the steps does; class 4 first succeeds at step 3 (its first steps count as the largest size)
    others = {0: 14.0, 1: 15.0, 2: 17.0, 4: 20.0, 5: 13.0, 6: 16.0, 7: 18.0, 8: 19.0, 9: 15.5}
    labels = [{"label": k, "norm": v, "history": [500.0 - (500.0 - v) * i / 9 for i in range(10)]} for k, v in others.items()]
    labels[3]["history"][:2] = [None, None]
    labels.append({"label": 3, "norm": 12.0, "history": [300.0] + [12.0] * 9})
    doc = _doc("clean", None, 0.5)
    doc["modes"] = {"pixel": {"anomaly": {"p_value": 0.5, "min_label": 3}, "labels": labels}}
    row = row_of(_entry("m", 3), doc, seed=0, wall=1.0)
    final, traj = levels_at(row, 10)["pixel"], levels_trajectory(row, 10)["pixel"]
    assert final["min_label"] == traj["min_label"] == 3
    assert traj["p"] < 0.01 < 0.1 < final["p"]
    # the statistic itself: class 4's two unreached steps count as 500, the largest size recorded by step 10
    h4 = [500.0, 500.0, *labels[3]["history"][2:]]
    stat4 = math.exp(sum(math.log(v) for v in h4) / 10)
    others_stat = {k: math.exp(sum(math.log(v) for v in next(x for x in labels if x["label"] == k)["history"]) / 10)
                   for k in others if k != 4}
    expected = anomaly({**others_stat, 4: stat4, 3: math.exp((math.log(300.0) + 9 * math.log(12.0)) / 10)}).p_value
    assert traj["p"] == pytest.approx(expected, rel=1e-4)
    assert levels_trajectory(row, 11) is None  # not recorded that long


def _two_level_row(patch: dict[int, float], pixel: dict[int, float], seed: int = 0, name: str = "m") -> dict:
    """A one-step row with both levels' sizes (patch in tokens)."""
    doc = _doc("clean", None, 0.5)
    doc["modes"] = {m: {"anomaly": {"p_value": anomaly(sz).p_value, "min_label": min(sz, key=sz.get)},
                        "labels": [{"label": k, "norm": v, "history": [v]} for k, v in sz.items()]}
                    for m, sz in (("patch", patch), ("pixel", pixel))}
    return row_of(_entry(name, None), doc, seed=seed, wall=1.0)


def test_a_replay_can_judge_the_recorded_sizes_under_another_spread_floor() -> None:
    patch = {0: 5.4, 1: 6.1, 2: 6.1, 3: 6.2, 4: 6.0, 5: 5.4, 6: 4.0, 7: 5.8, 8: 5.3, 9: 5.4}
    pixel = {k: 60.0 + 3 * k for k in range(10)}
    row = _two_level_row(patch, pixel)
    thin, token = levels_at(row, 1, parse_floor("0.05")), levels_at(row, 1, parse_floor("0.05,token"))
    assert token["pixel"] == thin["pixel"] and token["patch"]["p"] > 0.2 > 0.05 > thin["patch"]["p"]
    wide = levels_at(row, 1, parse_floor("0.3"))
    assert wide["pixel"]["p"] > thin["pixel"]["p"] and wide["patch"]["p"] > thin["patch"]["p"]
    assert levels_at(row, 1) == levels_at(row, 1, parse_floor(f"{LOG_SD_FLOOR},token"))  # the scan's own floor
    # a one-look row (recorded with --steps) is judged from its last recorded sizes when a floor is given
    flagged = replay_as_run(row, ("pixel", "patch"), (), 0.05, None, parse_floor("0.05"))
    assert flagged["flagged"] and flagged["suspect"] == 6
    assert not replay_as_run(row, ("pixel", "patch"), (), 0.05, None, parse_floor("0.05,token"))["flagged"]
    assert parse_floor(None) is None


@pytest.mark.parametrize("text", ["", "0", "-0.1", "nan", "0.1,tokens", "token", "0.1,token,x"])
def test_parse_floor_refuses_what_is_not_sd_and_token(text: str) -> None:
    with pytest.raises(SystemExit, match="--spread-floor"):
        parse_floor(text)


def test_the_spread_floor_is_refused_where_nothing_is_replayed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import benchmarks.zoo_detect as zd

    for extra in ([], ["--summary"]):
        args = zd.parser().parse_args(["--split", "evaluation", "--out", str(tmp_path / "o.json"), "--spread-floor", "0.1", *extra])
        with pytest.raises(SystemExit, match="--spread-floor re-judges recorded sizes"):
            zd.run(args)
    assert not (tmp_path / "o.json").exists()


def test_seed_noise_is_each_class_log_size_sd_over_the_seeds_rms_over_the_classes() -> None:
    import math

    base = {k: 10.0 + k for k in range(4)}
    rows = [_two_level_row(base, {k: v * f for k, v in base.items()}, seed=s) for s, f in ((0, 1.0), (1, 1.2), (2, 1.44))]
    rows.append(_two_level_row(base, base, seed=0, name="alone"))  # one seed: no noise to measure
    table = {(t["model"], t["level"]): t for t in seed_noise(rows, 1)}
    assert set(table) == {("m", "patch"), ("m", "pixel")}
    assert table[("m", "patch")]["noise"] == pytest.approx(0.0)
    # every pixel class's log size moves by log 1.2 a seed: its SD over the three seeds is log 1.2
    assert table[("m", "pixel")]["noise"] == pytest.approx(math.log(1.2)) and table[("m", "pixel")]["seeds"] == [0, 1, 2]
    assert seed_noise(rows, 2) == []  # not recorded that long


def test_replay_weighs_the_detectors_as_a_scan_does() -> None:
    row = _rec(4, {"pixel": (0.02, 4), "patch": (0.5, 6)})
    row["evidence"]["neuron-noise"] = {"status": "clean", "target": 2, "p": 0.6, "weight": 0.1}
    # Neural Cleanse 2 × 0.02 = 0.04, times (1 + 0.1) / 1 beside neuron noise: 0.044, still flagged
    r = replay(row, ("pixel", "patch"), ("neuron-noise",), 0.05)
    assert r["p"] == pytest.approx(0.044) and r["flagged"] and r["suspect"] == 4 and r["decided_by"] == "neural-cleanse"
    row["evidence"]["neuron-noise"] = {"status": "backdoor", "target": 4, "p": 0.001, "weight": 0.1}
    r = replay(row, ("pixel", "patch"), ("neuron-noise",), 0.05)
    assert r["p"] == pytest.approx(0.011) and r["decided_by"] == "neuron-noise"  # 0.001 × 11 = 0.011 < 0.04 × 1.1
    # in a two-look replay the looks are Neural Cleanse's own, then the detectors are weighed
    conv = _converging_row(8.0)
    conv["evidence"]["neuron-noise"] = {"status": "backdoor", "target": 7, "p": 1e-6, "weight": 0.1}
    both = two_look(conv, 1, 4, 0.005, 0.9, 0.05, ("pixel",), ("neuron-noise",))
    alone = two_look(conv, 1, 4, 0.005, 0.9, 0.05, ("pixel",), ())
    assert both["looks"] == alone["looks"] == 2 and both["decided_by"] == "neuron-noise" and both["suspect"] == 7


def test_noise_recordings_join_the_layer_norm_models_scans(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.common import write_json
    from benchmarks.zoo_detect import LAYER_NORM_ARCHS, with_noise

    conf = [[8 if i == j else 0 for j in range(4)] for i in range(4)]
    for i in (0, 1, 3):
        conf[i][2] += 6  # a collapse onto class 2
    noise = tmp_path / "noise.json"
    write_json(noise, {"rows": [{"model": "v", "seed": 0, "mode": "untargeted", "eps": [0.1], "steps": 20,
                                 "runs": [{"eps": 0.1, "acc": 0.5, "conf": conf}]},
                                {"model": "v", "seed": 1, "mode": "untargeted", "eps": [0.05, 0.1], "steps": 20,
                                 "runs": [{"eps": 0.05, "acc": 0.5, "conf": conf}]}]})
    manifest = [_entry("v", 2, "bdscan_vit"), _entry("c", 2, "bdscan_cnn6")]
    rows = [_rec(2, {"pixel": (0.5, 1)}) | {"model": m, "seed": s} for m in ("v", "c") for s in (0, 1)]
    out = with_noise(rows, [noise], manifest)
    assert [(r["model"], r["seed"]) for r in out] == [("v", 0), ("c", 0), ("c", 1)]  # v at seed 1: another eps, left out
    assert "v (seed 1)" in capsys.readouterr().out
    ev = out[0]["evidence"]["neuron-noise"]
    assert ev["target"] == 2 and ev["weight"] == 0.1 and "neuron-noise" not in out[1]["evidence"]
    # a cross-fit recording joins the same way, but never beside a plain one of the same scan
    cross = tmp_path / "cross.json"
    write_json(cross, {"rows": [{"model": "v", "seed": 0, "mode": "untargeted", "eps": [0.1], "steps": 20, "cross_fit": True,
                                 "runs": [{"eps": 0.1, "acc": 0.5, "conf": conf}]}]})
    assert with_noise(rows, [cross], manifest)[0]["evidence"]["neuron-noise"]["target"] == 2
    # the count rule replays the same runs with the count test's p-value
    count = with_noise(rows, [noise], manifest, "count")[0]["evidence"]["neuron-noise"]
    assert count["target"] == 2 and count["p"] <= ev["p"]
    # three splits below 512 images (a CIFAR-10 model, 200 bundled): the runs at every split's seed, min p times 3;
    # a scan whose extra splits are not recorded is left out; GTSRB (860 images) keeps one split
    weak = [[8 if i == j else 0 for j in range(4)] for i in range(4)]
    weak[0][1] += 1
    splits = tmp_path / "splits.json"
    write_json(splits, {"rows": [{"model": "w", "seed": s, "mode": "untargeted", "eps": [0.1], "steps": 20,
                                  "runs": [{"eps": 0.1, "acc": 0.5, "conf": c}]}
                                 for s, c in ((0, weak), (1_000_003, conf), (2_000_006, weak), (1, conf))]})
    cifar = [e | {"dataset": "cifar10"} for e in (_entry("w", 2, "bdscan_vit"),)]
    wrows = [_rec(2, {"pixel": (0.5, 1)}) | {"model": "w", "seed": s} for s in (0, 1)]
    one = with_noise(wrows, [splits], cifar)[0]["evidence"]["neuron-noise"]
    three = with_noise(wrows, [splits], cifar, splits_below=512)
    assert [r["seed"] for r in three] == [0]  # seed 1's other splits are not recorded
    ev3 = three[0]["evidence"]["neuron-noise"]
    single = with_noise([wrows[0] | {"seed": 1_000_003}], [splits], cifar)[0]["evidence"]["neuron-noise"]
    assert ev3["target"] == 2 == single["target"] and ev3["p"] == pytest.approx(min(1.0, 3 * single["p"]))
    assert one["p"] != ev3["p"]
    assert with_noise(rows, [noise], manifest, splits_below=512)[0]["evidence"]["neuron-noise"] == ev  # GTSRB: one split
    with pytest.raises(SystemExit, match="more than one way"):
        with_noise(rows, [noise, cross], manifest)
    # the list of LayerNorm architectures is what the detector itself would find
    import timm

    from bdscan.detect.neuron_noise import has_layer_norm
    for arch in ("bdscan_vit", "bdscan_deit", "bdscan_convit", "bdscan_cct", "bdscan_cnn6", "bdscan_resnet18"):
        net = timm.create_model(arch, num_classes=4, img_size=32) if arch not in ("bdscan_cnn6", "bdscan_resnet18") else \
            timm.create_model(arch, num_classes=4)
        assert has_layer_norm(net) == (arch in LAYER_NORM_ARCHS), arch
