"""Tests of :mod:`autobatch.cli` (the package's folders mirrored)."""
