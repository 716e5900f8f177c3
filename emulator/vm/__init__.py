"""One VM: the QEMU command line, the process and its channels, the accelerator probe, warm-start snapshots."""
