"""Contrastive and re-ranking losses, false-negative maskers and the cross-process gather (one loss per file)."""

from losses.base import ContrastiveLoss, LossOutput, SimilarityLoss, Temperature, validate_inputs
from losses.distributed import GatheredBatch, GatherMode, gather_batch
from losses.hybrid_nce import HybridNCE
from losses.infonce import InfoNCE
from losses.listwise import ListwiseSoftmax
from losses.maskers import DuplicateMasker, FalseNegativeMasker, GuideModelMasker, MarginMasker
from losses.matryoshka import Matryoshka
from losses.pointwise import PointwiseYesNo
from losses.rerank import RerankLoss, RerankScores
from losses.structure import BatchInfo, Direction, Structure
from losses.tag_clusters import TagClusterMap

__all__ = [
    "BatchInfo",
    "ContrastiveLoss",
    "Direction",
    "DuplicateMasker",
    "FalseNegativeMasker",
    "GatherMode",
    "GatheredBatch",
    "GuideModelMasker",
    "HybridNCE",
    "InfoNCE",
    "ListwiseSoftmax",
    "LossOutput",
    "MarginMasker",
    "Matryoshka",
    "PointwiseYesNo",
    "RerankLoss",
    "RerankScores",
    "SimilarityLoss",
    "Structure",
    "TagClusterMap",
    "Temperature",
    "gather_batch",
    "validate_inputs",
]
