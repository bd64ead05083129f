from lightning_modules.backbones.base import Backbone, BackboneOutput

__all__ = ["Backbone", "BackboneOutput"]
