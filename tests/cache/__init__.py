"""Tests of :mod:`autobatch.cache` (the package's folders mirrored)."""
