"""ADM-protocol evaluation (docs/CONTRACTS.md): Inception features via torch-fidelity, FID, sFID, IS,
precision/recall, FD_DINOv2, CKNNA. Everything here runs offline from local weight files. Import each from its
module (metrics.fd, metrics.inception, ...)."""
