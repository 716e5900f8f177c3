"""Long-lived VMs (``aperture up``): the daemon that owns one, its control socket and client, the registry."""
