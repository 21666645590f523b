"""One module (or package) per dataset; importing this package registers every one in SOURCES."""

from vlmerge.data.datasets import (  # noqa: F401  (registration)
    easy_vqa,
    fashion_mnist,
    image_folder,
    karpathy,
    nlvr2,
    segmentation,
    stamp_scenes,
    tuxpaint,
    vqav2,
    wordnet,
)
from vlmerge.data.datasets.emoji import source  # noqa: F401  (registration)
