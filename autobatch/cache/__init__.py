"""The probe cache: probe results on disk, keyed by what a step's memory depends on.

Holds the store (``store``: one JSON file per setup, atomic writes; ``files``: reading a file safely), the
key (``fingerprint`` of a setup, from ``codehash``, ``valuehash``, ``modulehash``, ``datahash`` and
``torchsettings``) and the cache as one probe sees it (``probestore``: rank 0 reads and writes).

May import: the foundations and :mod:`autobatch.result` (and the probe, for type checking only); ``store``
and ``files`` import no torch, so ``autobatch cache show`` answers at once.
"""
