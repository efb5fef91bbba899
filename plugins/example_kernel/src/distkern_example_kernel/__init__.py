"""distkern's in-tree example of a plugin with its own kernel: the ``diag-gaussian`` detector, scored by the
fused op ``torch.ops.distkern_example_kernel.standardized_sqdist`` (CPU and CUDA), built with
:mod:`distkern.cpp_extension` and benchmarked through the ``distkern.benchmarks`` entry-point group."""
from .detector import DiagGaussian
from .ops import reference, standardized_sqdist

__all__ = ["DiagGaussian", "standardized_sqdist", "reference"]
