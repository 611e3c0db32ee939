"""Library version and on-disk format versions."""

__version__ = "0.1.0"
# Bumped whenever the meaning or layout of saved files changes.
FACTORS_FORMAT = "ekfac-factors/1"
QUERIES_FORMAT = "preconditioned-queries/1"
