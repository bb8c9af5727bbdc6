"""The distributed runner: Ray Train V2 workers driving DeepSpeed ZeRO engines around the core step.

The runner's settings, declared once (``settings``: the job spec's sections are these models), a
typed :class:`~raptor.train.job.StageJob` in (``job``), a :class:`~raptor.train.trainer.Trainer`
per worker whose parts are named attributes (engine, loader, validator, checkpointer, logger),
checkpoints through Ray Train (``checkpoint``), the export (``export``), the TorchTrainer launch
(``launch``). The runner never reads the job spec (the service translates it), and only this
package and the service import Ray or DeepSpeed. Import the submodules directly: this file imports
nothing, so ``raptor --help`` stays fast.
"""
