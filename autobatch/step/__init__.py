"""One training step: the micro-steps and optimizer step of one model, all or nothing on every rank.

Holds the step function (``stepper``: autocast forward, loss, scaled backward, unscale, clip, step), the
transaction that runs a whole optimizer step on every rank (``transaction``), the snapshot that puts
everything back (``state``), the data a step reads (``data``, ``reading``) and the measured back-off
after an out-of-memory (``backoff``). The probe's trials, ``TrainStep`` and fit's loop all run it.

May import: the foundations, :mod:`autobatch.memory`, :mod:`autobatch.distributed` and
:mod:`autobatch.options` (the precisions).
"""
