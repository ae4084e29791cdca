"""``python -m benchmarks NAME [ARGS ...]``: runs one benchmark of the suite; no NAME or ``--help`` lists them."""

from __future__ import annotations

import os
import sys

from benchmarks import BENCHMARKS, load


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks NAME [ARGS ...]   (python -m benchmarks NAME --help: its arguments)", "",
             "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in BENCHMARKS.items()]
    lines += ["", "Results are written under benchmarks/results/; what they showed is in benchmarks/README.md."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{listing()}", file=sys.stderr)
        return 2
    module = load(name)
    ap = module.parser()
    ap.prog = f"python -m benchmarks {name}"
    try:
        module.run(ap.parse_args(rest))
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as a shell tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
