"""Backbones and heads, found by name in ``BACKBONES`` (which imports the built-in backbones on
its first lookup), and the input adapter for models that expect other images."""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "BACKBONES": "sslens.models.base",
    "Backbone": "sslens.models.base",
    "create_backbone": "sslens.models.base",
    "ProjectionHead": "sslens.models.heads",
    "ResNet": "sslens.models.resnet",
    "ImportReport": "sslens.models.resnet",
    "load_torchvision_state_dict": "sslens.models.resnet",
    "TimmBackbone": "sslens.models.timm_backbone",
    "InputAdapter": "sslens.models.adapt",
    "adapt_input": "sslens.models.adapt",
    "degenerate_encoder_warning": "sslens.models.health",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
