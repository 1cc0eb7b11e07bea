"""Self-supervised methods, each a small module over :class:`~sslens.methods.base.SSLMethod`,
found by name in ``METHODS`` (which imports the built-in methods on its first lookup)."""

from sslens.lazy import lazy_exports

_EXPORTS = {
    "METHODS": "sslens.methods.base",
    "SSLMethod": "sslens.methods.base",
    "StepOutput": "sslens.methods.base",
    "create_method": "sslens.methods.base",
    "SimCLR": "sslens.methods.simclr",
    "MoCo": "sslens.methods.moco",
    "SwAV": "sslens.methods.swav",
    "BarlowTwins": "sslens.methods.barlow_twins",
    "VICReg": "sslens.methods.vicreg",
    "BYOL": "sslens.methods.byol",
    "DINO": "sslens.methods.dino",
    "ImportedMethod": "sslens.methods.imported",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
