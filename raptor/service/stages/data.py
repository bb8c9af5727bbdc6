"""The data stage: writes the procedurally generated shards when ``data.generate`` is set and they are missing.

Its artifact is the data folders themselves (the spec names them), not a folder in the store, and it
is complete when every folder is (no ``stage.json``). Without ``data.generate`` the shards are given:
they are identified by their content, so shards rewritten in place move every key downstream. A
folder that already holds a dataset generated with other settings is never overwritten: the run
stops with a one-line error naming the folder.
"""

from __future__ import annotations

import math
from typing import Any

import braceexpand

from raptor import data, storage
from raptor.data.shards import INFO, PLAN, dataset_folder
from raptor.errors import UserError
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.spec import JobSpec


def generated(spec: JobSpec) -> list[tuple[str, str, str, Any]]:
    """(spec field, folder, prefix, source) of each dataset ``data.generate`` writes."""
    g = spec.data.generate
    assert g is not None
    out = [("data.train", dataset_folder(spec.data.train), "train",
            data.synthetic_source(g.train_samples, g.num_classes, g.image_size, g.seed))]
    if spec.data.val:
        out.append(("data.val", dataset_folder(spec.data.val), "val",
                    data.synthetic_source(g.val_samples, g.num_classes, g.image_size, g.seed + 1)))
    return out


def _num_shards(spec: JobSpec, url: str, prefix: str) -> int:
    """As many shards as a brace pattern names; for a folder, one per read stream of the default order
    (every rank's loader workers) or of ``data.streams``; the val split is read by one process."""
    if "{" in url:
        return len(list(braceexpand.braceexpand(url)))
    return max(spec.scaling.num_workers * max(1, spec.data.num_workers), spec.data.streams or 0) if prefix == "train" else 1


def is_done(spec: JobSpec) -> bool:
    """Every generated folder is complete (``_info.json``) and holds the dataset these settings make."""
    if spec.data.generate is None:
        return True
    complete = True
    for field, folder, _, source in generated(spec):
        plan_url = storage.join(folder, PLAN)
        if storage.exists(plan_url) and storage.read_json(plan_url).get("source") != source.fingerprint():
            raise UserError(f"{field}: {folder} holds a dataset generated with other data.generate settings; "
                            "point the spec at another folder or delete this one")
        complete &= storage.exists(storage.join(folder, INFO))
    return complete


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    written = {}
    for (field, folder, prefix, source), url in zip(generated(spec), [spec.data.train, spec.data.val]):
        if storage.exists(storage.join(folder, INFO)):
            continue
        per_shard = math.ceil(len(source) / _num_shards(spec, url or folder, prefix))
        info = data.write_shards(source, folder, prefix=prefix, max_samples=per_shard)
        written[field] = info["total"]
    return {"written": written}


def content(spec: JobSpec) -> dict[str, str]:
    """Given shards by content: every shard of each split and its info file, by size and version."""
    from raptor.data import Shards

    out = {}
    for field, url, split in (("data.train", spec.data.train, spec.data.train_split),
                              ("data.val", spec.data.val, spec.data.val_split)):
        if url is not None:
            shards = Shards.resolve(url, split=split)
            out[f"{field} (content)"] = storage.identity([*shards.urls, storage.join(shards.folder, INFO)])
    return out


STAGE = Stage(
    "data", reads=("data.train", "data.val", "data.generate"), upstream=(), run=run,
    given=lambda spec: spec.data.generate is None, content=content,
    location=lambda spec: dataset_folder(spec.data.train), complete=is_done,
)
