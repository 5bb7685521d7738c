"""The study registry: study names to their recipes, and what a run's record declares for its report.

Both the runner (which runs a study) and the report (which regenerates a run's files from its record) look studies up
here, so neither imports the other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from lmlab.studies.runner import Study

REGISTRY = {
    "hylorada": "lmlab.studies.hylorada_study:HYLORADA",
    "landmarks": "lmlab.studies.hylorada_study:LANDMARKS",
    "bucketing": "lmlab.studies.hylorada_study:BUCKETING",
    "latentwire": "lmlab.studies.latentwire_study:LATENTWIRE",
    "mu": "lmlab.studies.mu_study:MU",
}


def get_study(name: str) -> Study:
    if name not in REGISTRY:
        raise ConfigError(f"unknown study '{name}'; choose one of {', '.join(REGISTRY)}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def declarations(study: Study, cfg, configs: list[str]) -> dict:
    """What a run's record declares for its report: roles, claims, parameter matching and (where the study declares
    them) its comparisons, restricted to the configurations that run."""
    declared = {"roles": {c: r for c, r in study.roles(cfg).items() if c in configs}, "claims": study.claims(cfg),
                "param_match_ratio": study.param_match_ratio(cfg), "setting": study.setting(cfg)}
    comparisons = study.comparisons(cfg)
    if comparisons is not None:
        declared["comparisons"] = comparisons
    return declared
