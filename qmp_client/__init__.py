"""The QMP layer: sessions over qemu.qmp, typed helpers, (later) remaps and the interactive shell."""
