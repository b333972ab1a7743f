"""Meta-learning algorithms on one inner-loop engine. A new algorithm is one file plus one entry here."""

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.fomaml import FOMAML
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskMetrics
from metasft.algorithms.maml import MAML
from metasft.algorithms.reptile import Reptile
from metasft.algorithms.sft import SFT, MetaICL

__all__ = ["ALGORITHMS", "Episode", "InnerLoop", "MetaAlgorithm", "TaskMetrics", "build_algorithm"]

#: ``meta.algorithm`` name -> class; what each supports is declared on the class (see base.py).
ALGORITHMS: dict[str, type[MetaAlgorithm]] = {cls.name: cls for cls in (MAML, FOMAML, Reptile, SFT, MetaICL)}


def build_algorithm(meta_cfg) -> MetaAlgorithm:
    """The algorithm named by ``meta.algorithm`` (already resolved by config validation)."""
    return ALGORITHMS[meta_cfg.algorithm].from_config(meta_cfg)
