"""Training data as WebDataset tar shards in object storage: writing them and streaming them back.

Writing (any fsspec URL: a local folder or ``s3://bucket/prefix``)::

    from raptor.data import write_shards, imagefolder_source, listfile_source, synthetic_source
    info = write_shards(synthetic_source(4000, num_classes=10, size=112), "s3://bucket/synth",
                        max_samples=500)
    write_shards(imagefolder_source("/data/imagenet/train"), "s3://bucket/in1k/train")

- ``write_shards(samples_or_source, out_url, *, prefix="train", max_samples=1000,
  max_bytes=256 MiB, workers=4, reencode=None, classes=None, overwrite=False) -> info``
- ``imagefolder_source(root)``, ``listfile_source(path)`` (``path<TAB>label`` lines),
  ``synthetic_source(n, num_classes=10, size=112, seed=0, dense=False)``: the procedural set.
- ``read_info(url) -> dict``: ``_info.json`` of a raptor dataset folder or shard pattern:
  ``shards`` (name, samples, bytes), ``total``, ``classes``, ``num_classes``, ``dense``.

Reading datasets as they are published (:mod:`raptor.data.formats`): a raptor folder, timm's
WebDataset layout (``_info.json`` with ``splits``, e.g. ImageNet-1k as
``imagenet1k-train-{0000..1023}.tar``, picked by ``split=`` or a shard pattern), or ``.tar``
files with no info at all (``samples=`` states the count, else it is counted once from the tar
headers and cached in ``_raptor_counts.json``). ``Shards.resolve(url, split=...)`` and
``describe(url, ...)`` (what ``raptor shards info`` prints) say what the loader will read.

Reading, one call per rank (see :mod:`raptor.data.loader` for who reads which shards)::

    from raptor.data import loader
    train = loader("s3://bucket/synth", batch_size=64, image_size=112, num_workers=2)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, labels in train:   # exactly len(train) batches on every rank
            ...
        metrics.update(train.stats.as_dict())   # seen / skipped / shard_errors / repeated / read_retries

    in1k = loader("s3://bucket/in1k", split="train", label_key="cls", batch_size=256,
                  image_size=224, decode="gpu", device="cuda")   # decoded + normalised on the GPU

- ``loader(url, *, batch_size, image_size, train=True, shuffle=None, seed=0, epoch=0,
  num_workers=2, batches_per_epoch=None, resampled=False, rank=None, world_size=None,
  error_budget=0.01, dense=False, drop_last=True, patch_size=None, crop_scale=(0.08, 1.0),
  shuffle_buffer=1000, retries=3, backoff_s=1.0, pin_memory=False, split=None, samples=None,
  num_classes=None, label_key="cls", decode="cpu", device=None, normalize=True) -> ShardLoader``.
  Batches are ``(images float32 normalised, labels)`` on ``device`` (uint8 images with
  ``normalize=False``); dense batches are ``(images, labels, masks, depth)``. ``label_key``:
  ``cls`` or ``MEMBER:FIELD`` (``json:label``). ``decode="gpu"``: the training process decodes
  the JPEGs on ``device`` (:mod:`raptor.data.decode`). ``ShardLoader`` has ``len()`` (batches
  per epoch per rank), ``set_epoch(e)``, ``stats`` (:class:`DataStats`) and ``num_classes``.
- Errors: :class:`ErrorBudgetExceeded` (too much bad data), :class:`ShardUnavailableError`
  (a shard stayed unreachable through its retries, at open or mid-read),
  :class:`DatasetError` and ``raptor.errors.MissingInput`` (one-line user errors: a damaged info file,
  an unknown split, no shards).
- ``image_transform(size, train, patch_size=None, crop_scale=(0.08, 1.0))``: the DINOv2
  transform for one image, outside the loader.
"""

from raptor.data.errors import DatasetError
from raptor.data.gopen import ShardUnavailableError
from raptor.data.formats import Shards, count_shards, describe
from raptor.data.loader import ShardLoader, loader, resolve_rank
from raptor.data.reader import DataStats, ErrorBudgetExceeded
from raptor.data.shards import read_info, write_shards
from raptor.data.sources import Source, imagefolder_source, listfile_source
from raptor.data.synthetic import synthetic_source
from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_transform

__all__ = [
    "DataStats",
    "DatasetError",
    "ErrorBudgetExceeded",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShardLoader",
    "ShardUnavailableError",
    "Shards",
    "Source",
    "count_shards",
    "describe",
    "image_transform",
    "imagefolder_source",
    "listfile_source",
    "loader",
    "read_info",
    "resolve_rank",
    "synthetic_source",
    "write_shards",
]
