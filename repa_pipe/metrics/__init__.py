"""ADM-protocol evaluation (reference/eval.md): Inception features via torch-fidelity, FID, sFID, IS,
precision/recall, FD_DINOv2, CKNNA. Everything here runs offline from local weight files."""
from repa_pipe.metrics.cknna import cknna
from repa_pipe.metrics.dinov2 import dinov2_preprocess, fd_dinov2_features
from repa_pipe.metrics.evaluate import evaluate
from repa_pipe.metrics.fd import FrechetDistanceError, compute_stats, frechet_distance
from repa_pipe.metrics.inception import (InceptionFeatures, load_inception, make_random_inception_weights,
                                         spatial_from_mixed6)
from repa_pipe.metrics.inception_score import inception_score, inception_score_from_probs, split_bounds
from repa_pipe.metrics.npz_io import iter_batches, iter_npz_images, load_sample_npz
from repa_pipe.metrics.precision_recall import manifold_radii, precision_recall
from repa_pipe.metrics.reference import ReferenceStats

__all__ = [
    "InceptionFeatures", "load_inception", "make_random_inception_weights", "spatial_from_mixed6",
    "compute_stats", "frechet_distance", "FrechetDistanceError",
    "inception_score", "inception_score_from_probs", "split_bounds",
    "manifold_radii", "precision_recall",
    "ReferenceStats", "load_sample_npz", "iter_npz_images", "iter_batches",
    "dinov2_preprocess", "fd_dinov2_features", "cknna", "evaluate",
]
