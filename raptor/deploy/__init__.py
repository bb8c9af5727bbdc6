"""Deployment: Kubernetes manifests (KubeRay) rendered from a job spec, so the spec is the one source of truth.

The container image and the Ray cluster-launcher configs live in ``cluster/``; the rendered manifests
in ``k8s/``. Nothing here imports Ray: rendering runs anywhere the spec loads.
"""

from raptor.deploy.k8s import OVERLAYS, RenderError, render, write_tree

__all__ = ["OVERLAYS", "RenderError", "render", "write_tree"]
