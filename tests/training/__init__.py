"""Tests of :mod:`autobatch.training` (the package's folders mirrored)."""
