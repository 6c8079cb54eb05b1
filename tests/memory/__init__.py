"""Tests of :mod:`autobatch.memory` (the package's folders mirrored)."""
