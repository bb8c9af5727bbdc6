"""``raptor k8s render SPEC``: KubeRay manifests from a job spec, to stdout or as a kustomize tree."""

from __future__ import annotations

import argparse
import logging

from raptor.deploy.k8s import OVERLAYS, dump, render, write_tree

log = logging.getLogger(__name__)


def _render(args: argparse.Namespace) -> int:
    objects = render(args.spec, args.overlay, args.overrides)
    if args.out is None:
        print(dump(objects), end="")
        return 0
    for path in write_tree(objects, args.out, args.overlay, args.spec):
        log.info("wrote %s", path)
    log.info("apply with: kubectl apply -k %s/overlays/%s", args.out, args.overlay)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    k8s = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests generated from a job spec")
    actions = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "render",
        help="render the RayJob (with its RayCluster), NetworkPolicy, ServiceAccount and namespace for a spec",
        description="The entrypoint, runtime env, worker pods, GPUs and resources all come from the spec; "
        "an overlay is a named set of --set overrides that the job's entrypoint repeats.",
    )
    p.add_argument("spec", help="job spec path (as the image sees it, e.g. jobs/distill_k3.yaml) or URL")
    p.add_argument("--overlay", choices=sorted(OVERLAYS), default="multinode", help="dev: 1 GPU worker; multinode: the spec's scaling (default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a spec field (repeatable)")
    p.add_argument("--out", help="write DIR/base and DIR/overlays/OVERLAY for `kubectl apply -k`; default: print a YAML stream")
    p.set_defaults(func=_render)
