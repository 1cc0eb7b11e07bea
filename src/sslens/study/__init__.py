"""Studies: train several self-supervised models, explain them, and report the trade-off between
representation quality and explanation quality in one self-contained HTML report.

>>> from sslens.study import load_study_config, run_study  # doctest: +SKIP
>>> outcome = run_study(load_study_config("study-demo"), "study/")  # doctest: +SKIP
>>> outcome.report  # doctest: +SKIP
PosixPath('study/report.html')
"""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "StudyConfig": "sslens.study.spec",
    "ModelSpec": "sslens.study.spec",
    "load_study_config": "sslens.study.config",
    "DEFAULT_EXPERIMENTS": "sslens.study.experiments",
    "EXPERIMENTS": "sslens.study.experiments",
    "Experiment": "sslens.study.experiments",
    "register_experiment": "sslens.study.experiments",
    "StudyOutcome": "sslens.study.run",
    "format_tradeoff": "sslens.study.run",
    "run_study": "sslens.study.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
