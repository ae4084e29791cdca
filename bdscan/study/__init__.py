"""The research paper's study as a library: scan, repair and neuron analysis of every model of a zoo manifest.

Typical use (what ``bdscan study`` does)::

    result = run_study(Path("benchmarks/lab_zoo/zoo.json"), out, StudyConfig(budget="fast"))
    write_study(result, out)  # study.json, study.md, study.html, figures/

See :mod:`bdscan.study.run` for what is measured and :mod:`bdscan.study.tables` for the tables.
"""

from bdscan.study.run import SCHEMA, StudyConfig, StudyProgress, StudyResult, load_manifest, run_study, study_model
from bdscan.study.tables import Table, all_tables
from bdscan.study.write import write_study

__all__ = [
    "SCHEMA",
    "StudyConfig",
    "StudyProgress",
    "StudyResult",
    "Table",
    "all_tables",
    "load_manifest",
    "run_study",
    "study_model",
    "write_study",
]
