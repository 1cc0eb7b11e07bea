"""Studies: train several self-supervised models, explain them, and report the trade-off between
representation quality and explanation quality in one self-contained HTML report.

>>> from sslens.study import load_study_config, run_study  # doctest: +SKIP
>>> outcome = run_study(load_study_config("study-demo"), "study/")  # doctest: +SKIP
>>> outcome.report  # doctest: +SKIP
PosixPath('study/report.html')
"""

from sslens.study.config import StudyConfig, load_study_config
from sslens.study.experiments import (
    DEFAULT_EXPERIMENTS,
    EXPERIMENTS,
    Experiment,
    register_experiment,
)
from sslens.study.explainers import EXPLAINER_SPECS, ExplainerSpec, register_explainer
from sslens.study.run import StudyOutcome, format_tradeoff, run_study

__all__ = [
    "DEFAULT_EXPERIMENTS",
    "EXPERIMENTS",
    "EXPLAINER_SPECS",
    "Experiment",
    "ExplainerSpec",
    "StudyConfig",
    "StudyOutcome",
    "format_tradeoff",
    "load_study_config",
    "register_experiment",
    "register_explainer",
    "run_study",
]
