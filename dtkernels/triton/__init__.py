"""Triton kernels and their launchers, one module per op. Imported lazily by the
backend registry, so importing dtkernels never imports triton, and
TRITON_INTERPRET=1 set before the first Triton op still takes effect."""
