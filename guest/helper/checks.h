/* The rows of the check table and the fixtures they need, one declaration per unit that defines them; the
 * scenario table (scenarios.c) lists them. */
#ifndef APERTURE_CHECKS_H
#define APERTURE_CHECKS_H

#include <stddef.h>
#include <stdint.h>

#include "harness.h"

struct apdev;
struct daxmap;

/* dax.c */
extern const struct fixture fixture_dax_configured; /* NVDIMM regions in the modes the host asked for */
extern const struct fixture fixture_dax;            /* ... mounted (fsdax) and mapped (devdax) */
extern const struct check check_dax_persistence, check_dax_fsdax, check_dax_map_sync, check_dax_devdax,
    check_zone_device_probe;
struct dax_mappings {
    char *devdax;      /* the devdax mapping, or NULL */
    size_t devdax_size;
    char *fsdax_file;  /* a 2 MiB mapping of a file on the fsdax mount, or NULL */
};
struct dax_mappings dax_mappings(void);

/* checks_device.c */
extern const struct fixture fixture_devices; /* the aperture devices, discovered, and a devdax mapping */
extern const struct check check_aperture_persistence, check_aperture_window, check_aperture_hidden_refused,
    check_p2p_pmem_to_device, check_p2p_device_to_pmem, check_p2p_ram_to_device, check_p2p_device_to_device,
    check_aperture_bad_descriptors;
const struct daxmap *devices_daxmap(void);
uint64_t scratch_page(struct apdev *d, unsigned k);

/* checks_guest.c, nvdimm.c, p2pmem.c, witness.c, remap.c, fuzz.c */
extern const struct check check_guest_modules, check_guest_shares, check_nvdimm_present, check_zone_device_p2pmem, check_p2p_nvme_cmb,
    check_witness_hmm_tests, check_remap_consistency, check_aperture_fuzz;

/* checks_driver.c: the guest kernel driver (fixture: the last device bound to it) */
extern const struct fixture fixture_kdev;
extern const struct check check_zone_device_window, check_hmm_migrate, check_hmm_fault_back, check_p2p_peer_map,
    check_p2p_peer_map_hidden, check_p2p_pinned_vs_remap, check_driver_unload;

/* Benchmarks: bench_dax.c (fixture dax), bench_device.c (fixture devices). */
void bench_dax(void);
void bench_device(void);
void bench_driver(void); /* checks_driver.c, fixture kdev */

#endif
