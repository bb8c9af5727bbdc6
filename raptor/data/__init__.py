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

Reading, one call per rank (see :mod:`raptor.data.streaming` for the one sample order every world size shares)::

    from raptor.data import LoaderSettings, loader
    train = loader("s3://bucket/synth", LoaderSettings(batch_size=64, num_workers=2), image_size=112)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, labels in train:   # exactly len(train) batches on every rank
            ...
        metrics.update(train.stats.as_dict())   # seen / skipped / shard_errors / repeated / read_retries

    in1k = loader("s3://bucket/in1k", LoaderSettings(batch_size=256, decode="gpu"), split="train",
                  image_size=224, device="cuda")   # decoded + normalised on the GPU

- ``loader(url, settings, *, image_size, rank, world_size, device, ...)`` (:func:`raptor.data.streaming.loader`):
  ``settings`` (:class:`~raptor.data.settings.LoaderSettings`, the job spec's ``data`` section extends it)
  says how shards are read; the keywords say what this call reads. Batches are ``(images float32
  normalised, labels)`` on ``device`` (uint8 images with ``normalize=False``); dense batches are
  ``(images, labels, masks, depth)``. ``ShardLoader`` has ``len()`` (batches per epoch per rank),
  ``steps_per_epoch`` (global batches), ``set_epoch(e, start_step=0)``, ``stats`` (:class:`DataStats`)
  and ``num_classes``.
- Errors: :class:`ErrorBudgetExceeded` (too much bad data), :class:`ShardUnavailableError`
  (a shard stayed unreachable through its retries, at open or mid-read),
  :class:`DatasetError` and ``raptor.errors.MissingInput`` (one-line user errors: a damaged info file,
  an unknown split, no shards).
- ``image_transform(size, train, patch_size=None, crop_scale=(0.08, 1.0))``: the DINOv2
  transform for one image, outside the loader.
"""

import importlib
from typing import Any

# Loaded on first use: the job spec imports raptor.data.settings, and `raptor --help` or `raptor k8s render`
# must not pay for torch through this package's other modules.
_EXPORTS = {
    "count_shards": "raptor.data.formats",
    "DatasetError": "raptor.data.errors",
    "DataStats": "raptor.data.reader",
    "describe": "raptor.data.formats",
    "ErrorBudgetExceeded": "raptor.data.reader",
    "image_transform": "raptor.data.transforms",
    "imagefolder_source": "raptor.data.sources",
    "IMAGENET_MEAN": "raptor.data.transforms",
    "IMAGENET_STD": "raptor.data.transforms",
    "listfile_source": "raptor.data.sources",
    "loader": "raptor.data.streaming",
    "LoaderSettings": "raptor.data.settings",
    "read_info": "raptor.data.shards",
    "resolve_rank": "raptor.data.streaming",
    "ShardLoader": "raptor.data.streaming",
    "Shards": "raptor.data.formats",
    "ShardUnavailableError": "raptor.data.gopen",
    "Source": "raptor.data.sources",
    "synthetic_source": "raptor.data.synthetic",
    "write_shards": "raptor.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raptor.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
