"""aperture host side: VM configuration, QEMU launch, and (later) the device model."""
