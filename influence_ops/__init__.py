"""EK-FAC influence functions (Grosse et al. 2023) in pure PyTorch.

No Ray, pyarrow or fsspec here: this package runs alone on one CPU or GPU.
"""

from .batch import IGNORE_INDEX, TokenBatch, collate, query_batch
from .capture import Captured, capture
from .covariance import Covariances, LayerCovariance, fit_covariances
from .eigen import LayerEigen, eigendecompose
from .eigenvalue_correction import LambdaSums, fit_lambda
from .factors import EKFACFactors, LayerFactors, assemble_factors, fit_ekfac
from .fingerprint import model_fingerprint
from .gradients import backward_pass, per_sequence_gradients
from .ihvp import apply_inverse
from .layers import Track, TrackedLayer, find_mlp_layers, layers_by_name
from .normalize import Normalize
from .fisher import DEFAULT_DRAWS, DEFAULT_FISHER, Fisher, default_draws
from .objectives import LanguageModelObjective, Objective
from .query_basis import Basis, choose_basis
from .queries import LayerQuery, PreconditionedQueries, precondition_queries
from .query_prep import LowRankMethod, Precision, QueryPrep
from .query_storage import load_queries, save_queries
from .scores import ScoreResult, score_batch
from .self_influence import query_self_influence
from .storage import load_factors, save_factors
from .strategy import Strategy, choose_strategy, plan
from .topk import TopKAccumulator
from .version import __version__

__all__ = [
    "DEFAULT_DRAWS", "DEFAULT_FISHER", "IGNORE_INDEX", "Basis", "Captured", "Covariances", "EKFACFactors", "Fisher",
    "LambdaSums", "LanguageModelObjective", "LayerCovariance", "LayerEigen", "LayerFactors", "LayerQuery",
    "LowRankMethod", "Normalize", "Objective", "Precision", "PreconditionedQueries", "QueryPrep", "ScoreResult",
    "Strategy", "TokenBatch", "TopKAccumulator", "Track", "TrackedLayer", "__version__", "apply_inverse",
    "assemble_factors", "backward_pass", "capture", "choose_basis", "choose_strategy", "collate", "default_draws",
    "eigendecompose", "find_mlp_layers", "fit_covariances", "fit_ekfac", "fit_lambda", "layers_by_name",
    "load_factors", "load_queries", "model_fingerprint", "per_sequence_gradients", "plan", "precondition_queries",
    "query_batch", "query_self_influence", "save_factors", "save_queries", "score_batch",
]
