"""One training step: the micro-steps and optimizer step of one model, all or nothing on every rank.

Holds the step function (``stepper``: autocast forward, loss, scaled backward, unscale, clip, step), the
transaction that runs a whole optimizer step on every rank (``transaction``), the snapshot that puts
everything back (``state``), the data a step reads (``data``, ``reading``) and the measured back-off
after an out-of-memory (``backoff``). The probe's trials, ``TrainStep`` and fit's loop all run it. Also the
kernels a CUDA card runs, applied on the CPU for a prediction (``cudakernels``: CUDA's autocast lists, fused
attention and dropout).

May import: the foundations, :mod:`autobatch.memory`, :mod:`autobatch.distributed` and
:mod:`autobatch.options` (the precisions).
"""
