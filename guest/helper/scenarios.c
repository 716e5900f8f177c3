/* The one scenario table: what `aperture-helper SCENARIO` (main.c) and the host's {"scenario": NAME} command
 * (serve.c) run. A scenario runs the registered checks (TEST in each check's file) that carry its tag, in their
 * `order`: the persistence checks before the checks that write new stamps; the driver's after the helper's own
 * device checks (its fixture takes the last device from them), driver.unload first among them (it reloads the
 * driver, whose allocator then starts afresh, so the pages it wrote are reused by the checks after it instead of
 * overwriting the device bytes they claim). */
#include "checks.h"
#include "harness.h"
#include "report.h"

#include <string.h>
#include <unistd.h>

static void hang(void)
{
    for (;;)
        pause();
}

static const struct scenario scenarios[] = {
    {.name = "probe"}, /* hello and done only: the accelerator probe and the boot benchmark */
    {.name = "default", .tag = TAG_DEFAULT, .serve = 1},
    /* aperture up, the pytest plugin: DAX configured, then main.c serves the host's commands */
    {.name = "idle", .tag = TAG_NVDIMM, .fixture = &fixture_dax_configured, .serve_after = 1},
    {.name = "remap", .tag = TAG_REMAP},
    {.name = "bench-device", .fixture = &fixture_devices, .run = bench_device},
    {.name = "bench-dax", .fixture = &fixture_dax, .run = bench_dax},
    {.name = "bench-driver", .fixture = &fixture_kdev, .run = bench_driver},
    {.name = "nvdimm", .tag = TAG_NVDIMM, .serve = 1},
    {.name = "dax", .tag = TAG_DAX, .serve = 1},
    {.name = "aperture", .tag = TAG_APERTURE, .serve = 1},
    {.name = "driver", .tag = TAG_DRIVER, .serve = 1},
    {.name = "fuzz", .tag = TAG_FUZZ},
    {.name = "hang", .run = hang}, /* hello, then never done: the host's run timeout */
};

const struct scenario *scenario_find(const char *name)
{
    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
        if (!strcmp(scenarios[i].name, name))
            return &scenarios[i];
    return NULL;
}
