"""Training: epochs of accumulated optimizer steps, their progress, and evaluation.

Holds fit's loop (``loop``) and its progress bar (``progress``), and evaluation (``evaluate``; ``metrics``:
the scores; ``evalcheck``: what evaluation needs, checked before training).

May import: everything below the public API (the foundations, :mod:`autobatch.memory.device`,
:mod:`autobatch.step.stepper`, the setup, :mod:`autobatch.result`).
"""
