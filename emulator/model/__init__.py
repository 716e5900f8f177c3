"""The device model: device memory, control memory and window, the DMA engine, the address map, the ivshmem
server and the service that runs every device of one VM. Imports nothing above it (no VM, run or front end)."""
