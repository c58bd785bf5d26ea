"""Kernels compiled ahead of time at install (Cython, built by ``setup.py``).

Nothing here needs writable+executable memory at run time, so these run under the
hardened systemd unit (``MemoryDenyWriteExecute=yes``), where numba cannot.
"""
