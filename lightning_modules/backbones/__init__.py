from lightning_modules.backbones.base import Backbone, BackboneOutput
from lightning_modules.backbones.midashenglm import MiDashengLMBackbone
from lightning_modules.backbones.qwen_omni import PromptTemplates, QwenOmniThinker

__all__ = ["Backbone", "BackboneOutput", "MiDashengLMBackbone", "PromptTemplates", "QwenOmniThinker"]
