"""Spec fields that several stages read: the shards, and how each reads them.

A stage module lists its own section and whatever else it reads beside these; the key of each stage
is over the values of the fields it lists (``raptor.service.engine.graph.inputs``).
"""

from __future__ import annotations

# the shards a stage trains on, and how: the layout split, labels, counts, augmentation, decoding
TRAIN_DATA = ("data.train", "data.train_split", "data.train_samples", "data.label_key", "data.num_classes",
              "data.seed", "data.crop_scale", "data.decode", "data.streams")
# the shards a stage evaluates on (the val split, else the train split)
EVAL_DATA = ("data.val", "data.val_split", "data.train", "data.train_split", "data.label_key", "data.num_classes")
