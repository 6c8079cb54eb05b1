"""The probe: the largest micro-batch whose training survives, from a few real steps.

Holds the probe of one session (``prober``), its trials (``trials``: traced steps and verdicts in a
chosen allocator state) and the pure batch-size search (``search``).

May import: the foundations, :mod:`autobatch.memory.device`, :mod:`autobatch.step.stepper`, the setup
(:mod:`autobatch.session`, ``options``, ``distributed``) and :mod:`autobatch.result`.
"""
