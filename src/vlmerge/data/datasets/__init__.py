"""One module (or package) per dataset; importing this package registers every one in SOURCES."""

from vlmerge.data.datasets import easy_vqa, fashion_mnist, image_folder, karpathy, nlvr2, tuxpaint, vqav2, wordnet  # noqa: F401  (registration)
from vlmerge.data.datasets.emoji import source  # noqa: F401  (registration)
