"""The service: everything that reads the job spec, from the spec to a finished run.

    spec/       the job spec (one pydantic model composed of the runner's and the libraries' settings),
                its --set overrides, its generated reference, and translate.py: spec -> TeacherSettings,
                ShardSource, StageConfig, StageJob (the one translation)
    engine/     the stage graph (declared stages, content keys, the plan and its table), the pipeline
                (`raptor run`: plan, then make what is missing; run.json) and every artifact path
    stages/     one module per stage, each declaring itself (data, teacher, distances, discovery, stage1,
                stage2, probe, report; distill: what the two training stages share), and the registry
    sweep/      `raptor sweep` on Ray Tune: trials, the tuner, result tables, the drop-path depth study
    deploy/     `raptor plan` (sizing), `raptor submit` and `raptor k8s render`: the same entrypoint on a
                Ray cluster or KubeRay
    cli         the service's commands

Dependencies point down: service -> runner (``raptor.train``) -> libraries.
"""
