"""The distributed runner: Ray Train V2 workers driving DeepSpeed ZeRO engines around the core step.

Only this package (and the pipeline above it) imports Ray or DeepSpeed; ``raptor.distill`` and
``raptor.models`` stay plain PyTorch. Import the submodules directly (``raptor.train.trainer``,
``raptor.train.teacher_train``): this file imports nothing, so ``raptor --help`` stays fast.
"""
