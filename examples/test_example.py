"""An aperture test suite to copy: `pip install` aperture (its pytest plugin comes with it), then `pytest`.

Each test gets a freshly booted VM (about 5-8 s under TCG); `pytest -n auto` runs several at once.
"""

import pytest


@pytest.mark.aperture(devices=2)
def test_map_a_page_and_read_it_through_the_window(aperture_vm):
    # The guest maps device page 5 into slot 1 of device 0, writes through the window, and reads it back.
    r = aperture_vm.exec("aperture-helper map 0 1 5 && aperture-helper poke 0 1 0 c0ffee && "
                         "aperture-helper peek 0 1 0 3")
    assert r.rc == 0, r.output
    assert r.output.split()[-1] == "c0ffee"
    # The host sees the same bytes in the window slot (the slot is the live copy of page 5).
    dev = aperture_vm.devices[0]
    slot = dev.config.slot
    assert bytes(dev.window_file.view[slot : slot + 3]) == bytes.fromhex("c0ffee")


@pytest.mark.aperture(devices=2)
def test_device_to_device_dma(aperture_vm):
    dev0, dev1 = aperture_vm.devices
    slot = dev0.config.slot
    # Put a pattern into device 0's page 7 from the host, then map page 9 of device 1 into its slot 0.
    dev0.devmem.view[7 * slot : 7 * slot + 4] = b"P2P!"
    aperture_vm.map(1, 0, 9)
    window1 = next(d for d in aperture_vm.qmp.pci_devices() if d.qdev_id == "aperture1-win").bars[2][0]
    # Device 0's DMA engine copies its page 7 into device 1's window (a guest-physical address).
    r = aperture_vm.exec(f"aperture-helper dma 0 {7 * slot} {window1} 4 1")  # flag 1: source is device-local
    assert r.output.strip() == "OK"
    assert bytes(dev1.window_file.view[0:4]) == b"P2P!"


@pytest.mark.aperture(pmem=["256M:devdax"], devices=1)
def test_the_built_in_checks(aperture_vm):
    checks = aperture_vm.run_scenario("aperture")
    assert checks["p2p.pmem_to_device"].ok
    assert checks["aperture.bad_descriptors"].ok


@pytest.mark.aperture(devices=1, shares=["/usr/share/common-licenses:/mnt/licenses:ro"])
def test_a_host_directory_in_the_guest(aperture_vm):
    # shares=[HOSTDIR[:GUESTDIR][:ro]]: the host directory, seen in the guest over 9p; cwd= runs a command there.
    r = aperture_vm.exec("ls GPL-2 && touch refused", cwd="/mnt/licenses")
    assert "GPL-2" in r.output and "Read-only file system" in r.output and r.rc != 0
