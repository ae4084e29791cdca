"""``bdscan study`` (the research paper's experiments on a zoo) and ``bdscan lab`` (train models, inject backdoors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdscan.commands.common import EXIT_CLEAN, run_guarded
from bdscan.console import out, progress_bar, progress_callback
from bdscan.detect.config import DEFAULT_BUDGET
from bdscan.errors import LoadError, UsageError

lab_app = typer.Typer(help="The backdoor lab: train models and inject backdoors (positive controls).", no_args_is_help=True)


def study_cmd(
    manifest: Annotated[Path, typer.Argument(help="Zoo manifest (e.g. benchmarks/lab_zoo/zoo.json).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Study folder: study.md, study.html, study.json, figures/, models/.")],
    models: Annotated[list[str] | None, typer.Option("--models", help="Only these zoo models (repeatable).")] = None,
    budget_name: Annotated[str, typer.Option("--budget", help="Scan budget for every model.")] = DEFAULT_BUDGET,
    repair_epochs: Annotated[int, typer.Option("--repair-epochs", help="Unlearning epochs (Tables 4-5).")] = 8,
    no_repair: Annotated[bool, typer.Option("--no-repair", help="Skip Tables 4-5.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Rerun the research paper's experiments (Tables 1-9, Figures 3-5) on a model zoo; resumable."""

    def body() -> int:
        from bdscan.atomic import refuse_input_overwrite
        from bdscan.detect.config import budget
        from bdscan.study import StudyConfig, run_study, write_study

        refuse_input_overwrite(out_dir, [manifest])
        if not manifest.is_file():
            raise LoadError(f"{manifest}: no such manifest", "point to a zoo manifest such as benchmarks/lab_zoo/zoo.json")
        budget(budget_name)
        cfg = StudyConfig(budget=budget_name, seed=seed, repair=not no_repair, repair_epochs=repair_epochs,
                          models=tuple(models) if models else None, device=device).validate()
        with progress_bar(not quiet) as bar:
            draw = progress_callback(bar, "study")
            result = run_study(manifest, out_dir, cfg, lambda name, done, total: draw(done, total, {"model": name}))
        paths = write_study(result, out_dir)
        out.print(f"studied {len(result.computed)} model(s), reused {len(result.reused)}, skipped {len(result.skipped)}; "
                  f"wrote {paths['markdown']}")
        return EXIT_CLEAN

    run_guarded(body)


@lab_app.command("train")
def lab_train_cmd(
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see `bdscan models`).")],
    data: Annotated[Path, typer.Option("--data", help="Training .npz with x_train/y_train/x_test/y_test (uint8 NHWC).")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .safetensors.")],
    epochs: Annotated[int | None, typer.Option("--epochs", help="Default: per architecture.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Default: per architecture.")] = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="CNN teacher for DeiT's distillation token.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads while training.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train a clean model from scratch (seeded; held-out accuracy stored in its metadata)."""

    def body() -> int:
        from bdscan.atomic import refuse_input_overwrite
        from bdscan.io import load_model, save_safetensors
        from bdscan.lab import TrainConfig, train_clean

        refuse_input_overwrite(out_path, [data, teacher])
        if out_path.suffix != ".safetensors":
            raise UsageError(f"--out {out_path.name}: the lab writes .safetensors", "use a .safetensors file name")
        t = load_model(teacher).wrapper if teacher else None
        cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, threads=threads, teacher=t)
        with progress_bar(not quiet) as bar:
            res = train_clean(arch, data, cfg, progress_callback(bar, f"training {arch}"))
        save_safetensors(res.wrapper, out_path)
        out.print(f"wrote {out_path}: clean test accuracy {res.clean_acc:.1%} ({res.seconds:.0f} s)")
        return EXIT_CLEAN

    run_guarded(body)


@lab_app.command("inject")
def lab_inject_cmd(
    model: Annotated[Path, typer.Option("--model", help="The clean model (.safetensors made by `bdscan lab train`).")],
    data: Annotated[Path, typer.Option("--data", help="The training .npz the clean model was trained on.")],
    attack: Annotated[str, typer.Option("--attack", help="badnets, blended or trojan.")],
    target: Annotated[int, typer.Option("--target", help="Target class.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .safetensors (carries the original trigger).")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Attack parameter key=value, repeatable "
                                                   "(e.g. size=4, position=bottom-right, pattern=checkerboard, alpha=0.1).")] = None,
    poison_rate: Annotated[float, typer.Option("--poison-rate", help="Share of poisoned fine-tuning images.")] = 0.1,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Default: per architecture.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads while training.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Inject a backdoor (BadNets, Blended, Trojan attack) by fine-tuning on poisoned data."""

    def body() -> int:
        from bdscan.atomic import refuse_input_overwrite
        from bdscan.io import load_model, save_safetensors
        from bdscan.lab import AttackConfig, InjectConfig, inject, parse_attack_params

        refuse_input_overwrite(out_path, [model, data])
        if out_path.suffix != ".safetensors":
            raise UsageError(f"--out {out_path.name}: the lab writes .safetensors", "use a .safetensors file name")
        if not 0 < poison_rate < 1:
            raise UsageError(f"--poison-rate {poison_rate} is not in (0, 1)", "e.g. --poison-rate 0.1")
        clean = load_model(model).wrapper
        if not 0 <= target < clean.num_classes:
            raise UsageError(f"--target {target} is not a class of the model (0..{clean.num_classes - 1})", "pick a class index")
        cfg = AttackConfig(attack, target, parse_attack_params(attack, param or []))
        icfg = InjectConfig(poison_rate=poison_rate, epochs=epochs, seed=seed, threads=threads)
        with progress_bar(not quiet) as bar:
            res = inject(clean, data, cfg, icfg, progress_callback(bar, f"injecting {attack}"))
        save_safetensors(res.wrapper, out_path, trigger=res.trigger)
        out.print(f"wrote {out_path}: clean accuracy {res.clean_acc:.1%} (clean twin {res.clean_twin_acc:.1%}), "
                  f"attack success {res.asr:.1%}")
        return EXIT_CLEAN

    run_guarded(body)
