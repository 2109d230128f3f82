"""LocTex Engine: visual pre-training from localized narratives (Liu et al., ICCV 2021)."""
__version__ = "0.1.0"
