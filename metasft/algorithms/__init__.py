"""Meta-learning algorithms on one inner-loop engine. A new algorithm is one file plus one entry here."""

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.fomaml import FOMAML
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskMetrics
from metasft.algorithms.maml import MAML
from metasft.algorithms.reptile import Reptile
from metasft.algorithms.sft import SFT, MetaICL

__all__ = ["Episode", "InnerLoop", "MetaAlgorithm", "TaskMetrics", "build_algorithm"]


def build_algorithm(meta_cfg) -> MetaAlgorithm:
    """The algorithm named by ``meta.algorithm`` (already resolved by config validation)."""
    registry = {
        "maml": MAML,
        "fomaml": FOMAML,
        "reptile": lambda: Reptile(meta_cfg.inner_optimizer),
        "sft": SFT,
        "metaicl": MetaICL,
    }
    return registry[meta_cfg.algorithm]()
