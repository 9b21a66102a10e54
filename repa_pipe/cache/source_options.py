"""How an image source is listed and read: the encode commands' source options as one value (light: the CLI's
config modules import it)."""
from __future__ import annotations

from dataclasses import dataclass

# The per-image byte cap when none is given: 4 bytes per pixel of the default pixel budget (64 Mpx). A compressed
# image within the pixel budget is far smaller; the cap stops a device, a sparse file or a 2 GB tar member from
# being read into memory before the decoder could refuse it.
DEFAULT_MAX_MEGAPIXELS = 64.0  # the pixel budget (--max-megapixels); ImageNet's largest images are under 20 Mpx
BYTES_PER_BUDGET_PIXEL = 4
DEFAULT_MAX_BYTES = int(BYTES_PER_BUDGET_PIXEL * DEFAULT_MAX_MEGAPIXELS * 1e6)


@dataclass(frozen=True)
class SourceOptions:
    """How a source is listed and read (the encode commands' source options).

    unlabeled: the source has no labels (a Hugging Face split whose label is -1): every sample gets label 0 of one
    class. follow_links: follow symbolic links to folders, and links leading outside an ImageFolder's root (each
    real folder is listed once). max_bytes: per-image byte cap. spool: the folder `pipe:` shards are copied into
    (None: a temporary folder removed at exit)."""

    unlabeled: bool = False
    follow_links: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    spool: str | None = None
