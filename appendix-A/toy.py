"""Appendix A: the reusable pieces of the PyTorch introduction.

A.5 `NeuralNetwork` (a multilayer perceptron with two hidden layers), A.6 `ToyDataset` and
`make_toy_data` / `make_toy_loaders` (five training points, two test points, two classes),
A.7 `train` and `compute_accuracy`, plus `flat_weights` / `weights_fingerprint`, which
`DDP-script.py` (A.9) uses to show that every process ends with the same weights.

This module only needs PyTorch, so `DDP-script.py` can fall back to importing it as a
plain file when the project is not installed.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class NeuralNetwork(torch.nn.Module):
    """A.5: a multilayer perceptron, num_inputs -> 30 -> 20 -> num_outputs, ReLU in between.

    The last layer returns logits (unnormalised scores): `F.cross_entropy` applies the
    softmax itself, which is cheaper and numerically safer than doing it in the model.
    """

    def __init__(self, num_inputs: int, num_outputs: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            # 1st hidden layer
            torch.nn.Linear(num_inputs, 30),
            torch.nn.ReLU(),
            # 2nd hidden layer
            torch.nn.Linear(30, 20),
            torch.nn.ReLU(),
            # output layer
            torch.nn.Linear(20, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch_size, num_inputs) -> logits: (batch_size, num_outputs)
        logits = self.layers(x)
        return logits


class ToyDataset(Dataset):
    """A.6: wraps a feature matrix (num_examples, num_features) and a label vector (num_examples,)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        # New: mismatched features and labels fail here, not at some later index.
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
        self.features = X
        self.labels = y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        one_x = self.features[index]
        one_y = self.labels[index]
        return one_x, one_y

    def __len__(self) -> int:
        return self.labels.shape[0]


def make_toy_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A.6: a hand-made, linearly separable data set with 2 features and 2 classes.

    Class 0 sits top left (x1 < 0, x2 > 0), class 1 bottom right. Returns
    X_train (5, 2), y_train (5,), X_test (2, 2), y_test (2,).
    """
    X_train = torch.tensor([
        [-1.2, 3.1],
        [-0.9, 2.9],
        [-0.5, 2.6],
        [2.3, -1.1],
        [2.7, -1.5],
    ])
    y_train = torch.tensor([0, 0, 0, 1, 1])
    X_test = torch.tensor([
        [-0.8, 2.8],
        [2.6, -1.6],
    ])
    y_test = torch.tensor([0, 1])
    return X_train, y_train, X_test, y_test


def make_toy_loaders(batch_size: int = 2, seed: int = 123) -> tuple[DataLoader, DataLoader]:
    """A.6: training loader (shuffled with its own seeded generator, last incomplete batch
    dropped) and test loader (in order) over `make_toy_data()`."""
    X_train, y_train, X_test, y_test = make_toy_data()
    train_loader = DataLoader(ToyDataset(X_train, y_train), batch_size=batch_size, shuffle=True,
                              drop_last=True, num_workers=0,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(ToyDataset(X_test, y_test), batch_size=batch_size, shuffle=False,
                             num_workers=0)
    return train_loader, test_loader


def train(model: torch.nn.Module, train_loader: DataLoader, num_epochs: int = 3, lr: float = 0.5,
          device: torch.device | str | None = None, verbose: bool = False) -> list[float]:
    """A.7: plain stochastic gradient descent on the cross-entropy loss.

    Moves the model to `device` (default: where its parameters already are) and every
    batch with it. Returns the loss of every batch, in order.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for epoch in range(num_epochs):
        model.train()  # matters for dropout/batch norm; harmless here
        for batch_idx, (features, labels) in enumerate(train_loader):
            features, labels = features.to(device), labels.to(device)
            logits = model(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()  # gradients accumulate unless reset
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if verbose:
                print(f"Epoch: {epoch + 1:03d}/{num_epochs:03d}"
                      f" | Batch {batch_idx + 1:03d}/{len(train_loader):03d}"
                      f" | Train/Val Loss: {loss:.2f}")
    model.eval()
    return losses


def compute_accuracy(model: torch.nn.Module, dataloader: DataLoader,
                     device: torch.device | str | None = None) -> float:
    """A.7 (with A.9's `device`): fraction of examples whose highest logit is the true label (1.0 = 100%)."""
    # New: `device` is optional and defaults to where the model's parameters are.
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.eval()
    correct = 0.0
    total_examples = 0

    for idx, (features, labels) in enumerate(dataloader):
        features, labels = features.to(device), labels.to(device)
        with torch.no_grad():
            logits = model(features)
        predictions = torch.argmax(logits, dim=1)  # (batch_size,)
        compare = labels == predictions
        correct += torch.sum(compare)
        total_examples += len(compare)

    return (correct / total_examples).item()


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    """All parameters in one float32 CPU vector (state-dict order); 752 values for NeuralNetwork(2, 2)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def weights_fingerprint(model: torch.nn.Module) -> tuple[str, float]:
    """(sha256 of the raw float32 bytes, sum of all weights): equal hashes mean bit-identical weights."""
    flat = flat_weights(model)
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    return digest, float(flat.double().sum())
