"""Bayes-PFL (Bayesian Prompt Flow Learning) zero-shot anomaly detection on distkern's fused ops."""
from .encoders import ImageFeatures, OpenCLIPEncoder, TinyEncoder, VisionLanguageEncoder
from .flows import ImageAgnosticFlow, ImageSpecificFlow, planar_flow
from .model import RCA, BayesPFL

__all__ = ["BayesPFL", "RCA", "TinyEncoder", "OpenCLIPEncoder", "VisionLanguageEncoder", "ImageFeatures",
           "ImageSpecificFlow", "ImageAgnosticFlow", "planar_flow"]
