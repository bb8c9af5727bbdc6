"""Where a job runs: submission to a Ray cluster, KubeRay manifests, and per-GPU sizing (``raptor plan``)."""
