"""Toy chains with exact (linear-Gaussian) or high-sample reference (tanh) gradients."""
from .linear import LinearGaussianChain, linear_chain
from .nonlinear import TanhChain, tanh_chain
from .rewards import Cosine, Quadratic, SoftplusBump
from .stats import MeanTest, mean_test, reference_gradient, two_sample_test

__all__ = ["Cosine", "LinearGaussianChain", "MeanTest", "Quadratic", "SoftplusBump", "TanhChain", "linear_chain",
           "mean_test", "reference_gradient", "tanh_chain", "two_sample_test"]
