"""The demo's judge: a small classifier trained on REAL images, which says whether a sample shows the class it
was asked for. It is independent of the diffusion model: never used in training, nor as the alignment target.

Input mapping: uint8 (N, R, R, 3) -> area-downsample to (J, J, 3) with J = min(R, 16) (8 for the digits) ->
standardised with the training split's mean and std. Model: scikit-learn MLPClassifier (one hidden layer of 128
ReLU units, adam, L2 1e-3, seed 0), trained on a stratified 80% of the real images; the other 20% give its
held-out accuracy, the honest ceiling for any score it gives samples. Its hidden layer is also the feature
space of a Frechet distance between samples and the real images (a small-scale stand-in for FID).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from repa_pipe.metrics.fd import compute_stats, frechet_distance

HIDDEN = 128
MAX_SIDE = 16


def judge_input(images: np.ndarray, side: int) -> np.ndarray:
    """(N, R, R, 3) uint8 -> (N, side*side*3) float32 in [0, 1]: the mean of each (R/side)^2 block."""
    n, h, w, c = images.shape
    if h % side or w % side:
        raise ValueError(f"images of {h}x{w} do not split into {side}x{side} blocks")
    x = images.astype(np.float32).reshape(n, side, h // side, side, w // side, c).mean(axis=(2, 4))
    return (x / 255.0).reshape(n, -1)


def judge_side(resolution: int) -> int:
    """The side the judge looks at: the largest divisor of the resolution up to 16."""
    return max(d for d in range(1, min(resolution, MAX_SIDE) + 1) if resolution % d == 0)


@dataclass
class Judge:
    side: int
    mean: np.ndarray
    std: np.ndarray
    mlp: Any                     # sklearn.neural_network.MLPClassifier
    heldout_accuracy: float
    real_stats: tuple[np.ndarray, np.ndarray]
    num_classes: int

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, seed: int = 0, holdout: float = 0.2) -> "Judge":
        """Train on a stratified (1 - holdout) split of real images; score the rest."""
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        side = judge_side(images.shape[1])
        x = judge_input(images, side)
        train, test = train_test_split(np.arange(len(labels)), test_size=holdout, stratify=labels,
                                       random_state=seed)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, max_iter=400, random_state=seed)
        with warnings.catch_warnings():  # a last-iteration "not converged" note is expected and harmless here
            warnings.simplefilter("ignore")
            mlp.fit((x[train] - mean) / std, labels[train])
        judge = cls(side, mean, std, mlp, 0.0, (np.zeros(1), np.zeros((1, 1))), int(labels.max()) + 1)
        judge.heldout_accuracy = float((judge.predict(images[test]) == labels[test]).mean())
        judge.real_stats = compute_stats(judge.hidden(images))
        return judge

    def _x(self, images: np.ndarray) -> np.ndarray:
        return (judge_input(images, self.side) - self.mean) / self.std

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self._x(images))

    def hidden(self, images: np.ndarray) -> np.ndarray:
        """(N, 128) ReLU activations of the hidden layer."""
        return np.maximum(self._x(images) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)

    def frechet_distance(self, images: np.ndarray) -> float:
        """FD between the hidden-layer statistics of `images` and of all the real images."""
        mu, sigma = compute_stats(self.hidden(images))
        return float(frechet_distance(mu, sigma, *self.real_stats, method="eigh"))  # no ADM parity to keep here

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Conditional accuracy (the share of samples classified as the label they were drawn for), per class,
        and the FD to the real images."""
        pred = self.predict(images)
        per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan")
                     for c in range(self.num_classes)]
        return {"accuracy": float((pred == labels).mean()), "per_class": per_class,
                "fd": self.frechet_distance(images), "num_samples": int(len(labels)),
                "judge_heldout_accuracy": self.heldout_accuracy}
