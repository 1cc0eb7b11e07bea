"""Backbones and heads. Importing this package registers every backbone in ``BACKBONES``."""

from sslens.models import resnet, timm_backbone  # noqa: F401  (registers the backbones)
from sslens.models.base import BACKBONES, Backbone, create_backbone
from sslens.models.heads import ProjectionHead
from sslens.models.resnet import ImportReport, ResNet, load_torchvision_state_dict
from sslens.models.timm_backbone import TimmBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "ImportReport",
    "ProjectionHead",
    "ResNet",
    "TimmBackbone",
    "create_backbone",
    "load_torchvision_state_dict",
    "resnet",
]
