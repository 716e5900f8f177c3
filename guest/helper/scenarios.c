/* The one scenario table: what `aperture-helper SCENARIO` (main.c) and the host's {"scenario": NAME} command
 * (serve.c) run. Check order matters only where a check reads what an earlier boot left: the persistence
 * checks run before the checks that write new stamps. */
#include "checks.h"
#include "harness.h"
#include "report.h"

#include <string.h>
#include <unistd.h>

#define DAX_CHECKS &check_dax_persistence, &check_dax_fsdax, &check_dax_map_sync, &check_dax_devdax, \
    &check_zone_device_probe
#define DEVICE_CHECKS &check_aperture_persistence, &check_aperture_window, &check_aperture_hidden_refused, \
    &check_p2p_pmem_to_device, &check_p2p_device_to_pmem, &check_p2p_ram_to_device, &check_p2p_device_to_device, \
    &check_aperture_bad_descriptors

/* The guest driver's checks: after the helper's own device checks (the fixture takes the last device from it).
 * driver.unload first: it unbinds, unloads and reloads the driver, whose allocator then starts afresh, so the
 * pages it wrote are reused by the checks after it instead of overwriting the device bytes they claim. */
#define DRIVER_CHECKS &check_driver_unload, &check_zone_device_window, &check_hmm_migrate, &check_hmm_fault_back, \
    &check_p2p_peer_map, &check_p2p_peer_map_hidden, &check_p2p_pinned_vs_remap

static const struct check *const default_checks[] = {
    &check_guest_modules, &check_guest_shares, &check_nvdimm_present, DAX_CHECKS, DEVICE_CHECKS, &check_zone_device_p2pmem,
    &check_p2p_nvme_cmb, &check_witness_hmm_tests, DRIVER_CHECKS, NULL,
};
static const struct check *const driver_checks[] = {DRIVER_CHECKS, NULL};
static const struct check *const nvdimm_checks[] = {
    &check_guest_modules, &check_guest_shares, &check_nvdimm_present, NULL,
};
static const struct check *const dax_checks[] = {DAX_CHECKS, NULL};
static const struct check *const device_checks[] = {DEVICE_CHECKS, NULL};
static const struct check *const remap_checks[] = {
    &check_guest_modules, &check_nvdimm_present, &check_remap_consistency, NULL,
};
static const struct check *const fuzz_checks[] = {&check_guest_modules, &check_aperture_fuzz, NULL};

static void hang(void)
{
    for (;;)
        pause();
}

static const struct scenario scenarios[] = {
    {.name = "probe"}, /* hello and done only: the accelerator probe and the boot benchmark */
    {.name = "default", .checks = default_checks, .serve = 1},
    /* aperture up, the pytest plugin: DAX configured, then main.c serves the host's commands */
    {.name = "idle", .checks = nvdimm_checks, .fixture = &fixture_dax_configured, .serve_after = 1},
    {.name = "remap", .checks = remap_checks},
    {.name = "bench-device", .fixture = &fixture_devices, .run = bench_device},
    {.name = "bench-dax", .fixture = &fixture_dax, .run = bench_dax},
    {.name = "bench-driver", .fixture = &fixture_kdev, .run = bench_driver},
    {.name = "nvdimm", .checks = nvdimm_checks, .serve = 1},
    {.name = "dax", .checks = dax_checks, .serve = 1},
    {.name = "aperture", .checks = device_checks, .serve = 1},
    {.name = "driver", .checks = driver_checks, .serve = 1},
    {.name = "fuzz", .checks = fuzz_checks},
    {.name = "hang", .run = hang}, /* hello, then never done: the host's run timeout */
};

const struct scenario *scenario_find(const char *name)
{
    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
        if (!strcmp(scenarios[i].name, name))
            return &scenarios[i];
    return NULL;
}
