"""Model side: backbones, poolers, heads, metrics and the EmbeddingModule that composes them."""

from lightning_modules.backbones import Backbone, BackboneOutput, MiDashengLMBackbone
from lightning_modules.backbones.qwen_omni import PromptTemplates, QwenOmniThinker
from lightning_modules.adapters import LoraSettings
from lightning_modules.guide import BagOfWordsGuide, PretrainedTextGuide, TextGuide
from lightning_modules.heads import Head, IdentityHead, LinearHead, MLPHead, ModalityHeads
from lightning_modules.module import EmbeddingModule
from lightning_modules.rerank import RerankModule
from lightning_modules.poolers import EmbTokenPooler, LastTokenPooler, MeanPooler, Pooler

__all__ = [
    "BagOfWordsGuide",
    "LoraSettings",
    "PretrainedTextGuide",
    "TextGuide",
    "Backbone",
    "BackboneOutput",
    "EmbTokenPooler",
    "EmbeddingModule",
    "Head",
    "IdentityHead",
    "LastTokenPooler",
    "LinearHead",
    "MLPHead",
    "MeanPooler",
    "MiDashengLMBackbone",
    "ModalityHeads",
    "Pooler",
    "PromptTemplates",
    "QwenOmniThinker",
    "RerankModule",
]
