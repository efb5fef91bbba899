"""PaDiM (Patch Distribution Modeling) as a distkern method plugin."""
from .padim import PaDiM

__all__ = ["PaDiM"]
