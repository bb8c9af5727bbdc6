"""The stage engine: the stage graph (keys, inputs), the run folder and store, and the pipeline that runs the stages."""
