"""The probe: the largest micro-batch whose training survives, from a few real steps.

Holds the probe of one session (``prober``), its trials (``trials``: traced steps and verdicts in a
chosen allocator state) and the pure batch-size search (``search``).

Also a probe of a session from the probe cache where verification agrees (``cached``), what ``probe``,
``fit`` and ``TrainStep`` run; and the prediction for a GPU this host does not have (``prediction``:
``autobatch.predict``), whose steps run on fake tensors (``fake``) and are answered from their traces alone
(``traced``).

May import: the foundations, :mod:`autobatch.memory`, :mod:`autobatch.step`, the setup
(:mod:`autobatch.session`, ``options``, ``distributed``, ``planner``), :mod:`autobatch.cache` (``cached``)
and :mod:`autobatch.result`.
"""
