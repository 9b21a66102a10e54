"""The paper's representation analysis (section 3, Figures 2-3 and 8) on any run: per block and noise level t,
how well the SiT's hidden states align with the cached encoder features (CKNNA) and how linearly decodable the
class is from them (a linear probe).

Protocol (following the paper's appendix C.1 and its authors' answers in REPA issues #24, #32, #55):
- hidden state = a block's output (the raw residual stream, no projector), averaged over the patch tokens;
- the model sees x_t = (1 - t) x0 + t eps (the run's interpolant) with the NULL class label, so no label leaks
  into the representation; x0 is the posterior mean of the cached latents (scaled), eps is drawn per row from a
  generator seeded by (seed, row);
- the encoder side is the cached patch tokens of the same rows, averaged over tokens;
- CKNNA with k = 10 mutual nearest neighbours on L2-normalised rows, no outlier clamp, unbiased HSIC
  (metrics/cknna.py; platonic-rep's definition);
- linear probe: standardise with the training split's mean and std (a parameter-free batch norm), then
  multinomial logistic regression (scikit-learn, lbfgs, L2 C=1) on a seeded split; accuracy on the held-out part.
  The split holds rows out from the probe, not from the diffusion model: the cache is the training set, so the
  probe's held-out rows are images the SiT trained on, where the paper probes ImageNet validation images. Point
  `--cache` at a cache of held-out images (same encoder and codec) to probe unseen ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from repa_pipe.cache.reader import CacheReader
from repa_pipe.metrics.cknna import cknna
from repa_pipe.models import transport
from repa_pipe.models.samplers import PerSampleRandn
from repa_pipe.models.sit import SiT
from repa_pipe.pipeline.precision import compute
from repa_pipe.pipeline.progress import Tracker
from repa_pipe.pipeline.seeding import derive_seed


@dataclass
class Analysis:
    """CKNNA and probe accuracy per noise level (row) and block (column, 1-indexed)."""

    times: list[float]
    blocks: list[int]
    cknna: list[list[float]]            # [t][block]
    probe: list[list[float]]            # [t][block]
    encoder_probe: float                # the cached features' own probe accuracy (the ceiling to compare with)
    aligned_block: int | None           # the block REPA aligned (None for a baseline run)
    num_samples: int
    features: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pooled_hidden_states(model: SiT, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(L, B, D) float32: every block's output averaged over the tokens, for one forward of `model`."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.float().mean(dim=1))) for b in model.blocks]
    try:
        model.forward_velocity(x_t, t, y)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs)


def linear_probe(x: np.ndarray, y: np.ndarray, holdout: float, seed: int) -> float:
    """Held-out accuracy of a linear classifier on standardised features (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(holdout * len(x))))
    test, train = order[:n_test], order[n_test:]
    if len(np.unique(y[train])) < 2:
        return float(np.mean(y[test] == y[train][0]))
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000)
    clf.fit((x[train] - mean) / std, y[train])
    return float(clf.score((x[test] - mean) / std, y[test]))


@torch.no_grad()
def analyze_model(model: SiT, reader: CacheReader, latents: str, features: str, rows: np.ndarray, *,
                  scaling_factor: float, path: str, times: tuple[float, ...], topk: int, holdout: float,
                  batch_size: int, precision: str, seed: int, device: torch.device,
                  aligned_block: int | None) -> Analysis:
    """Hidden states of `model` on cache rows `rows` at every t, against the cached features of those rows."""
    model.eval()
    c = model.in_channels
    labels = reader.labels[rows]
    enc = np.zeros((len(rows), reader.arrays[features].shape[-1]), dtype=np.float32)  # (n, D_enc)
    hidden = np.zeros((len(times), model.depth, len(rows), model.hidden_size), dtype=np.float32)
    with Tracker("analyze", len(times) * len(rows), unit="row", every_s=10.0) as bar:
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            got = reader.gather(part)  # latents and features of these rows, one read
            enc[i:i + len(part)] = got[features].astype(np.float32).mean(axis=1)
            moments = torch.from_numpy(got[latents].astype(np.float32)).to(device)
            x0 = moments[:, :c] * scaling_factor  # posterior mean, model space
            noise = PerSampleRandn([derive_seed(seed, int(r)) for r in part], device)(tuple(x0.shape[1:]))
            y = torch.full((len(part),), model.null_class, device=device)
            for k, t in enumerate(times):
                tt = torch.full((len(part),), t, device=device)
                with compute(precision, device):
                    h = pooled_hidden_states(model, transport.interpolate(x0, noise, tt, path), tt, y)
                hidden[k, :, i:i + len(part)] = h.cpu().numpy()
                bar.update(len(part))
    ck = [[cknna(hidden[k, b], enc, topk=topk) for b in range(model.depth)] for k in range(len(times))]
    probe = [[linear_probe(hidden[k, b], labels, holdout, seed) for b in range(model.depth)]
             for k in range(len(times))]
    return Analysis(times=list(times), blocks=list(range(1, model.depth + 1)), cknna=ck, probe=probe,
                    encoder_probe=linear_probe(enc, labels, holdout, seed), aligned_block=aligned_block,
                    num_samples=len(rows), features=features,
                    meta={"topk": topk, "probe_holdout": holdout, "seed": seed, "pooling": "mean over tokens",
                          "label": "null", "x0": "posterior mean"})
