"""The QMP layer: sessions over qemu.qmp, everything known about QEMU itself, host-driven remaps, snapshots' QMP
steps and the interactive QMP shell."""
