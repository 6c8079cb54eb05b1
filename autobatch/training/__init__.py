"""Training: optimizer steps of a whole batch, the epochs of fit, and evaluation.

Holds one optimizer step with back-off and regrowth (``runner``), run by fit's loop (``loop``, with its
progress bar: ``progress``) and by a user's own loop (``trainstep``: ``autobatch.TrainStep``), and
evaluation (``evaluate``; ``metrics``: the scores; ``evalcheck``: what evaluation needs, checked before
training).

May import: everything below the public API: the foundations, :mod:`autobatch.memory`,
:mod:`autobatch.step`, the setup, :mod:`autobatch.probing` (``TrainStep``'s probe) and
:mod:`autobatch.result`.
"""
