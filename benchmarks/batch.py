"""Batch scans on Ray: the zoo one model after the other against one ``bdscan scan`` over all of them.

Three runs of the same models (default: the 12 CIFAR-10 sample models but the two ResNet-18s), each through the
command line in a fresh process:

1. **sequential**: ``bdscan scan MODEL -q --budget B --out DIR`` per model, one after the other (what a user
   does today; 2 torch threads, the CLI's default);
2. **batch**: ``bdscan scan M1 ... M12 -q --budget B --out DIR --no-cache``: an embedded Ray, one task per model,
   1 CPU (1 torch thread) each, so two at once on 2 cores;
3. **cluster**: a two-node Ray cluster on this machine (``ray start --head --port P --num-cpus 1`` on 127.0.0.1,
   plus ``ray start --address [::ffff:127.0.0.1]:P --num-cpus 1``), the same batch with ``--ray-address``, and which
   node ran each task; both nodes are stopped at the end.

Each run records its wall time and its peak memory: the sum of the proportional set size (PSS: shared pages
split between the processes that map them) of the command and every process under it (Ray's GCS, raylet and
workers included), sampled every 0.25 s. The cluster run's nodes are not under the command, so its memory is
not compared. Results are compared verdict by verdict (status, target, each level's anomaly index). Ray's own
cost per model is the task's wall time seen by the driver minus the scan's own time (``run_scan``, measured in
the worker): scheduling, a worker's start and imports, and moving the request in and the outputs back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import LAB_ZOO, Stopwatch, add_budget, add_out, machine_line, new_parser, utc_now, write_json

#: the CIFAR-10 zoo but its two slowest models (the ResNet-18s): 12 models
DEFAULT_MODELS = [p for p in sorted(LAB_ZOO.glob("cifar10_*.safetensors")) if "resnet18" not in p.name]
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a Ray driver or head node on 127.0.0.1 only


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("models", nargs="*", type=Path, help="model files (default: 12 CIFAR-10 sample models)")
    add_budget(ap, "smoke")
    ap.add_argument("--scan-args", default="--levels pixel --no-activations --steps 4",
                    help="more `bdscan scan` options for every run (default: %(default)s: the runs fit ~15 minutes on 2 loaded cores)")
    ap.add_argument("--parts", default="sequential,batch,cluster", help="which runs (default: %(default)s)")
    ap.add_argument("--port", type=int, default=6393, help="the head node's port for the cluster run (default: %(default)s)")
    add_out(ap, "batch.json")
    return ap


# ------------------------------------------------------------------------------------------------ measuring


def _tree(root: int) -> list[int]:
    """``root`` and every process under it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of a process tree every 0.25 s; ``peak_mb`` and the process count at the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self.procs = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            kb = sum(_pss_kb(p) for p in pids)
            if kb > self.peak_kb:
                self.peak_kb, self.procs = kb, len(pids)
            self._stop.wait(0.25)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kb / 1024)


def bdscan(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m bdscan.cli ARGS`` in a fresh process: exit code, wall seconds, peak PSS (MB), output tail."""
    with tempfile.TemporaryFile("w+") as log, Stopwatch() as sw:
        p = subprocess.Popen([sys.executable, "-m", "bdscan.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                             env=os.environ | (env or {}))
        mem = PeakMemory(p.pid)
        code = p.wait()
        peak = mem.stop()
        log.seek(0)
        tail = log.read()[-3000:]
    if code not in (0, 1):
        raise SystemExit(f"bdscan {' '.join(args[:3])} ...: exit {code}\n{tail}")
    return {"code": code, "seconds": round(sw.seconds, 1), "peak_pss_mb": peak, "processes_at_peak": mem.procs, "tail": tail}


def verdict(scan_dir: Path) -> dict[str, Any]:
    doc = json.loads((scan_dir / "scan.json").read_text())
    v = doc["verdict"]
    return {"status": v["status"], "target": v.get("target"),
            "ai": {m: round(r["anomaly"]["anomaly_index"], 4) for m, r in (doc.get("modes") or {}).items()},
            "scan_s": doc["timings"].get("total_s")}


def batch_verdicts(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    s = json.loads((out / "summary.json").read_text())
    return {Path(r["path"]).stem: verdict(out / r["folder"]) | {"row": r} for r in s["rows"]}, s


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, Any]:
    same = [m for m in a if (a[m]["status"], a[m]["target"]) == (b[m]["status"], b[m]["target"])]
    diffs = [abs(a[m]["ai"][lv] - b[m]["ai"][lv]) for m in a for lv in a[m]["ai"] if lv in b[m]["ai"]]
    return {"same_verdict_and_target": len(same), "of": len(a), "different": sorted(set(a) - set(same)),
            "max_abs_anomaly_index_diff": round(max(diffs), 4) if diffs else None}


def overhead(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Ray's cost per model: the driver's wall time of each task minus the scan's own (run_scan) time."""
    rows = summary["rows"]
    per = [r["wall_seconds"] - r["seconds"] for r in rows]
    setup = [r["task_seconds"] - r["seconds"] for r in rows]
    payload = [sum(f.stat().st_size for f in (out / r["folder"]).rglob("*") if f.is_file()) for r in rows]
    cold = per[:2]  # the first two tasks start the two workers (a Python process importing torch and bdscan)
    return {"ray_init_s": summary["engine"].get("startup_s"), "ray_shutdown_s": summary["engine"].get("shutdown_s"),
            "per_model_overhead_s": {"median": round(statistics.median(per), 2), "first_two": [round(x, 2) for x in cold],
                                     "median_after_first_two": round(statistics.median(per[2:]), 2) if len(per) > 2 else None},
            "in_task_setup_s_median": round(statistics.median(setup), 3),
            "outputs_per_model_kb_median": round(statistics.median(payload) / 1024)}


# ------------------------------------------------------------------------------------------------ the cluster


def _session_pids(log: Path) -> list[int]:
    """The processes of the Ray session a ``ray start --block`` log names (for a clean stop)."""
    text = log.read_text() if log.exists() else ""
    marker = "/tmp/ray/session_"
    if marker not in text:
        return []
    session = text.split(marker, 1)[1].split("/", 1)[0]
    out = subprocess.run(["pgrep", "-f", f"session_{session}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class LocalCluster:
    """Two Ray nodes on this machine, 1 CPU each, started with ``ray start --block`` and stopped at the end.

    The head binds 127.0.0.1 (Ray without multi-node support); the second node joins through the same address
    written as IPv4-mapped IPv6, ``[::ffff:127.0.0.1]``, because Ray (2.60) rewrites the literal 127.0.0.1 into the
    host's network address whenever multi-node support is on (as a second node needs).
    """

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.dir = port, workdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def _start(self, args: list[str], env: dict[str, str], name: str) -> None:
        log = self.dir / f"{name}.log"
        with log.open("w") as fh:
            p = subprocess.Popen(["ray", "start", *args, "--block"], stdout=fh, stderr=subprocess.STDOUT, env=os.environ | env)
        self.procs.append((p, log))

    def __enter__(self) -> LocalCluster:
        auth = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self._start(["--head", "--port", str(self.port), "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                     "--include-dashboard", "false", "--disable-usage-stats"], auth | LOOPBACK_ENV, "head")
        self.wait(1)
        self._start(["--address", f"[::ffff:127.0.0.1]:{self.port}", "--num-cpus", "1"],
                    auth | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, "node2")
        self.nodes = self.wait(2)
        return self

    def wait(self, n: int, timeout: float = 240) -> list[str]:
        code = (f"import ray; ray.init(address='127.0.0.1:{self.port}', log_to_driver=False, logging_level='ERROR'); "
                "import json; print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        t0 = time.time()
        while time.time() - t0 < timeout:
            time.sleep(3)
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env=os.environ | LOOPBACK_ENV | {"RAY_AUTH_MODE": "token"})
            if p.returncode == 0:
                nodes = json.loads(p.stdout.strip().splitlines()[-1])
                if len(nodes) >= n:
                    return nodes
        raise SystemExit(f"the local Ray cluster did not reach {n} node(s) in {timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        for p, log in reversed(self.procs):
            p.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                p.wait(90)
            except subprocess.TimeoutExpired:
                p.kill()
            for pid in _session_pids(log):  # anything of that session (named in its command line) still alive
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would remove: our cluster's address
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()


# ------------------------------------------------------------------------------------------------ the benchmark


def run(args: argparse.Namespace) -> None:
    models = [Path(m) for m in (args.models or DEFAULT_MODELS)]
    parts = set(args.parts.split(","))
    scan = ["-q", "--budget", args.budget, *args.scan_args.split()]
    result: dict[str, Any] = {"machine": machine_line(), "measured_at": utc_now(), "budget": args.budget, "scan_args": args.scan_args,
                              "models": [m.stem for m in models], "loadavg_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="bdscan-bench-batch-") as tmp_s:
        tmp = Path(tmp_s)
        seq: dict[str, dict[str, Any]] = {}
        if "sequential" in parts:
            runs = []
            for m in models:
                r = bdscan(["scan", str(m), *scan, "--out", str(tmp / "seq" / m.stem)])
                seq[m.stem] = verdict(tmp / "seq" / m.stem) | {"end_to_end_s": r["seconds"], "peak_pss_mb": r["peak_pss_mb"]}
                runs.append(r)
                print(json.dumps({"sequential": m.stem, **{k: seq[m.stem][k] for k in ("status", "target", "end_to_end_s")}}), flush=True)
            result["sequential"] = {"seconds": round(sum(r["seconds"] for r in runs), 1),
                                    "peak_pss_mb": max(r["peak_pss_mb"] for r in runs), "models": seq}
        if "batch" in parts:
            r = bdscan(["scan", *map(str, models), *scan, "--out", str(tmp / "batch"), "--no-cache"])
            got, summary = batch_verdicts(tmp / "batch")
            result["batch"] = {"seconds": r["seconds"], "peak_pss_mb": r["peak_pss_mb"], "processes_at_peak": r["processes_at_peak"],
                               "engine": summary["engine"], "overhead": overhead(summary, tmp / "batch"),
                               "models": {k: {x: v[x] for x in ("status", "target", "ai", "scan_s")} for k, v in got.items()}}
            if seq:
                result["batch"]["vs_sequential"] = compare(seq, got)
            print(json.dumps({"batch": {k: result["batch"][k] for k in ("seconds", "peak_pss_mb", "overhead")}}), flush=True)
        if "cluster" in parts:
            with LocalCluster(args.port, tmp) as cluster:
                r = bdscan(["scan", *map(str, models), *scan, "--out", str(tmp / "cluster"), "--no-cache",
                            "--ray-address", f"127.0.0.1:{args.port}"], env=LOOPBACK_ENV | {"RAY_AUTH_MODE": "token"})
                got, summary = batch_verdicts(tmp / "cluster")
                nodes = [v["row"]["node"] for v in got.values()]
                result["cluster"] = {"seconds": r["seconds"], "node_addresses": cluster.nodes, "engine": summary["engine"],
                                     "tasks_per_node": {n[:8]: nodes.count(n) for n in sorted(set(nodes))},
                                     "models": {k: {x: v[x] for x in ("status", "target", "ai")} for k, v in got.items()}}
            base = result.get("batch", {}).get("models")
            if base:
                result["cluster"]["vs_batch"] = compare(base, got)
            print(json.dumps({"cluster": {k: result["cluster"][k] for k in ("seconds", "node_addresses", "tasks_per_node")}}), flush=True)
    result["loadavg_after"] = round(os.getloadavg()[0], 2)
    write_json(args.out, result)
    print(f"\n{result['machine']}; budget {args.budget}; {len(models)} models; load average {result['loadavg_before']} -> "
          f"{result['loadavg_after']}")
    for name in ("sequential", "batch", "cluster"):
        if name in result:
            r = result[name]
            extra = {k: r[k] for k in ("vs_sequential", "vs_batch", "tasks_per_node", "overhead") if k in r}
            print(f"{name}: {r['seconds']} s, peak PSS {r.get('peak_pss_mb', '-')} MB; {json.dumps(extra)}")
