"""Tests of :mod:`autobatch.probing` (the package's folders mirrored)."""
