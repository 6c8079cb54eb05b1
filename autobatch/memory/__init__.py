"""Device memory: what a device holds and how much a training step needs.

Holds the device-memory policy (``device``: a limit enforced on CUDA or emulated elsewhere), the emulated
device (``emulate``, ``ledger``), the model of CUDA's caching allocator (``allocator``, ``expandable``,
``alloc_conf``, ``_blocks``), a step's memory as a function of its batch (``timeline``) and over consecutive
training steps (``survival``), out-of-memory handling (``oom``), the CPU thread policy (``threads``), what a
model holds between steps (``footprint``), what a CUDA process's allocator holds outside any step
(``runtime``: cuBLAS's workspaces, which the cap counts) and the GPUs a prediction can be made for (``cards``:
their memory, the CUDA context and the cuBLAS workspaces).

May import: the foundations (``autobatch.errors``, ``units``, ``validate``, ``_tree``) and torch; the
allocator model, the timelines and the survival replay import no torch at all.
"""
