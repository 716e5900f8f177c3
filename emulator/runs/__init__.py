"""Runs: a VM booted or restored, the helper's checks collected and verified on the host (``aperture run``,
``run -- CMD``, ``run --shell``)."""
