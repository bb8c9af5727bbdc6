"""``raptor teacher train SPEC``: train the spec's teacher on its shards (see raptor.train.teacher_train)."""

from __future__ import annotations

import argparse
import json

from raptor.config import load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    teacher = subparsers.add_parser("teacher", help="teacher models")
    sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="supervised training of the spec's timm ViT on data.train (drop-path from teacher.drop_path_rate)")
    train.add_argument("spec", help="job spec YAML")
    train.add_argument("--out", default=None, help="output URL (default: <storage.url>/teacher/teacher.safetensors)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from raptor import storage
    from raptor.train.teacher_train import train_teacher

    spec = load_spec(args.spec, args.overrides)
    out = args.out or storage.join(spec.storage.url, "teacher", "teacher.safetensors")
    metrics = train_teacher(spec, out)
    print(json.dumps({"teacher": out, **metrics}))
    return 0
