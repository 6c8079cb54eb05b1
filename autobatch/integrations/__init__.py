"""Integrations: autobatch inside the trainers people already use.

Holds the Hugging Face ``Trainer`` subclass (``transformers``: :class:`AutoBatchTrainer`, each optimizer
step run as autobatch's transaction, in micro-batches that fit, with the Trainer's own loss, optimizer,
precision and collator) and the Lightning callback (``lightning``: :class:`AutoBatch`, which probes the
module's own step before training and sets its batch size and ``accumulate_grad_batches``).

Each module imports its framework at the top, and nothing else in autobatch imports a framework: install
the extra (``pip install 'autobatch[hf]'`` or ``'autobatch[lightning]'``) and import the module itself,
e.g. ``from autobatch.integrations.transformers import AutoBatchTrainer``. This package's ``__init__``
imports neither.

May import: the public API and the layers below it (the foundations, :mod:`autobatch.memory`,
:mod:`autobatch.step`, the setup, :mod:`autobatch.probing`, :mod:`autobatch.training`,
:mod:`autobatch.result`), and its framework, imported only here.
"""
