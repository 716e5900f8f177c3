"""aperture host side: VM configuration, QEMU launch, the device model, runs, the daemon and the front ends
(sub-packages by job; docs/architecture.md draws the layers)."""
