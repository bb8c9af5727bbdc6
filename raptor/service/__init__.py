"""The service: everything that reads the job spec, from the spec to a finished run.

    spec        the job spec (one pydantic model) and its --set overrides
    build       spec -> TeacherRef, ShardSource, StageConfig, StageJob (the one translation)
    layout      every artifact path: the run folder and the content-addressed store
    graph       stages with declared inputs, content keys, the plan and its table
    stages/     one module per stage: data, teacher, discovery (distances + boundaries), distill, probe, report
    pipeline    `raptor run`: plan, then make what is missing; run.json
    submit, k8s `raptor submit` and `raptor k8s render`: the same entrypoint on a Ray cluster or KubeRay
    cli         the service's commands

Dependencies point down: service -> runner (``raptor.train``) -> libraries.
"""
