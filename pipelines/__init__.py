"""Ray Data pipelines over ``influence_ops``: tokenize, fit-factors, build-queries, score, merge, run.

Imports ``influence_ops``; never the other way round.
"""

from .config import ConfigError, JobConfig, config_from_dict, load_config

__all__ = ["ConfigError", "JobConfig", "config_from_dict", "load_config"]
