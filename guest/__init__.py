"""Everything that runs inside the VM, and the build of the guest image."""
