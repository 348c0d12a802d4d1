"""Appendix A: an introduction to PyTorch.

`appendix_a.toy` holds the pieces the appendix builds (a small multilayer perceptron, a
toy two-feature data set, the training loop and an accuracy helper); the notebooks and
`DDP-script.py` import them from there. Device choice comes from the project's runtime
(`llmfs.runtime.get_device`).
"""

from appendix_a.toy import NeuralNetwork, ToyDataset, compute_accuracy, make_toy_data, make_toy_loaders, train

__all__ = ["NeuralNetwork", "ToyDataset", "compute_accuracy", "make_toy_data", "make_toy_loaders", "train"]
