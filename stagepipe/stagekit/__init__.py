"""The stages' shared kit: what every stage module may import, and no stage module is.

- ``base``: ``PipelineStage``, the stage contract as the stages see it (when a stage joins, what
  it reads and writes, its cost row, its part of the report, the hooks through which a method
  kind's stage allocates or assembles), and the registry ``register`` fills;
- ``artifacts``: the name, writer and reader of every file a stage leaves on disk;
- ``plan``: the one ``Plan`` per (config, model facts): the stages and their order, the capture
  checkpoint interval, the predicted disk, RAM and time per stage;
- ``shards``: contiguous shards of the calibration windows and their ordered reduction;
- ``checkpoints``: checkpoint files inside a partition and the one resumable Adam;
- ``streams``: the two input streams of a sequential stage (dense and compressed block inputs);
- ``training``: the loop of a learned method's training and its trainers' registry.

Stage modules (``stagepipe/stages/*``) import from here and from lower layers, never each other
(``import-linter``, pyproject.toml).
"""
