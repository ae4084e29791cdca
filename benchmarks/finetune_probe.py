"""One fine-tune recipe of the evaluation zoo tried on a base before its rows are (re)built (issue #23): clean
accuracy and attack success every ``--probe-every`` steps, then both on the full test split, against the
accuracy of the cell's built clean twins.

Fine-tunes ``benchmarks/zoo/bases/<base>_base.safetensors`` with the zoo's own code (``bdscan.lab.evalzoo_finetune``)
and the family recipe of the row kind ``--kind`` (``bdscan.lab.evalzoo_plan.finetune_recipe``), changed by ``--set``
(e.g. ``steps=1600,poison_rate=0.2,cross_ratio=0.5``), poisoning with ``--attack``/``--params`` to ``--target``.
The probe uses the first ``--test`` test images; the final figures use the full test split after float16 rounding,
as the build measures a row. Runs are keyed by their arguments: a finished key is skipped (resumable), results
are appended to ``--out``. One torch thread (as the zoo builds), so a run is deterministic on one machine.

Example (WaNet's recipe, GTSRB CNN6)::

    python -m benchmarks finetune-probe --base gtsrb_cnn6 --kind wanet --attack wanet \\
        --params '{"k": 4, "s": 2.0, "cross_ratio": 0.5, "seed": 11}' --set steps=1600,poison_rate=0.2,cross_ratio=0.5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from benchmarks.common import (
    EVAL_ZOO,
    AttackConfig,
    add_out,
    find_data_dir,
    finetune,
    finetune_recipe,
    load_dataset,
    load_model,
    machine_line,
    make_trigger,
    measure,
    new_parser,
    parse_overrides,
    print_row,
    read_json,
    round_to_half_,
    set_threads,
    utc_now,
    write_json,
)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("--base", required=True, help="<dataset>_<arch short name>, e.g. gtsrb_cnn6")
    ap.add_argument("--kind", default="wanet", help="the row kind whose recipe is the start (default: %(default)s)")
    ap.add_argument("--attack", default="wanet", help="trigger name (bdscan.lab.attacks; default: %(default)s)")
    ap.add_argument("--params", default="{}", help="trigger parameters, JSON")
    ap.add_argument("--target", type=int, default=7, help="target class (default: %(default)s)")
    ap.add_argument("--set", default="", help="recipe fields to change, e.g. 'steps=1600,poison_rate=0.2'")
    ap.add_argument("--seed", type=int, default=5, help="the fine-tune's seed (default: %(default)s)")
    ap.add_argument("--test", type=int, default=1500, help="test images the probe uses (default: %(default)s)")
    ap.add_argument("--probe-every", type=int, default=200, help="steps between probes (default: %(default)s)")
    add_out(ap, "finetune_probe.json")
    return ap


def _twins_acc(base: str) -> float | None:
    """Mean clean accuracy of the cell's built clean twins (manifest), or None."""
    rows = read_json(EVAL_ZOO, [])
    accs = [r["clean_acc"] for r in rows if r["cell"] == base and r["attack"] is None and r.get("clean_acc") is not None]
    return sum(accs) / len(accs) if accs else None


def run(args: argparse.Namespace) -> None:
    set_threads(1)
    dataset, arch_short = args.base.split("_", 1)
    key = {"base": args.base, "kind": args.kind, "attack": args.attack, "params": json.loads(args.params),
           "target": args.target, "set": parse_overrides(args.set), "seed": args.seed, "test": args.test}
    doc = read_json(args.out, {"benchmark": "finetune-probe", "runs": []})
    if any(r["key"] == key for r in doc["runs"]):
        print(f"already measured: {json.dumps(key)} (see {args.out})")
        return
    data = load_dataset(dataset, find_data_dir(None))
    base = load_model(EVAL_ZOO.parent / "bases" / f"{args.base}_base.safetensors").wrapper
    recipe = replace(finetune_recipe(f"bdscan_{arch_short}", dataset, args.kind), **key["set"])
    trigger = make_trigger(AttackConfig(args.attack, args.target, key["params"]), data.input_size, model=base,
                           x=data.x_train[:512].float() / 255.0)
    sub = replace(data, x_test=data.x_test[: args.test], y_test=data.y_test[: args.test])

    def probe(step: int, w: object) -> dict:
        acc, asr = measure(w, sub, trigger)
        return {"probe_acc": round(acc, 4), "probe_asr": round(asr, 4)}

    t0 = time.perf_counter()
    res = finetune(base, data, recipe, args.seed, trigger, args.target, probe=probe, probe_every=args.probe_every)
    sub_acc, sub_asr = measure(res.wrapper, sub, trigger)
    round_to_half_(res.wrapper)
    acc, asr = measure(res.wrapper, data, trigger)
    twins = _twins_acc(args.base)
    row = {"key": key, "recipe": recipe.to_dict(), "curve": [(h["step"], h["probe_acc"], h["probe_asr"]) for h in res.history if "probe_acc" in h],
           "probe_final": [round(sub_acc, 4), round(sub_asr, 4)], "clean_acc": round(acc, 4), "asr": round(asr, 4),
           "twins_clean_acc": None if twins is None else round(twins, 4),
           "drop_vs_twins": None if twins is None else round(twins - acc, 4),
           "seconds": round(time.perf_counter() - t0, 1), "machine": machine_line(), "when": utc_now()}
    print_row({k: row[k] for k in ("clean_acc", "asr", "twins_clean_acc", "drop_vs_twins", "seconds")})
    doc = read_json(args.out, {"benchmark": "finetune-probe", "runs": []})  # re-read: another run may have written
    doc["runs"].append(row)
    write_json(args.out, doc)
