"""Tests of :mod:`autobatch.step` (the package's folders mirrored)."""
