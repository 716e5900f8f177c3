/* aperture-helper: runs inside the guest as /init's payload and reports JSON lines to the host.
 * Usage: aperture-helper [SCENARIO]   (default: $aperture_scenario, else "default")
 *   probe    hello + done only (accelerator probe, boot benchmarks)
 *   default  every check this build knows
 *   bench-dax  configure DAX, report memcpy figures
 *   bench-device  MAP round trips and DMA throughput figures (needs a configured devdax)
 *   remap      the window workload while the host remaps slots ($aperture_duration seconds)
 *   idle       configure DAX, report, then serve commands from the host (aperture up, pytest plugin)
 * Tools (print to stdout, for `exec` in a live guest): info | map DEV SLOT PAGE | unmap DEV SLOT | flood DEV N S |
 *   dma DEV SRC DST LEN [FLAGS] | peek DEV SLOT OFF LEN | poke DEV SLOT OFF HEX
 *   hang     report hello, then never finish (exercises the host's run timeout)
 */
#include "report.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void modules_check(void)
{
    char failed[4096];
    /* /init lists modules that insmod refused; an empty or missing file means all loaded. */
    if (read_text("/run/modules.failed", failed, sizeof(failed)) == 0 && failed[0]) {
        struct jbuf jb;
        jb_init(&jb);
        jb_printf(&jb, "{\"failed\":");
        jb_str(&jb, failed);
        jb_printf(&jb, "}");
        report_check(APERTURE_CHECK_GUEST_MODULES, 0, jb.buf);
    }
}

int main(int argc, char **argv)
{
    int tool = helper_tool(argc, argv);
    if (tool >= 0)
        return tool;
    const char *scenario = argc > 1 ? argv[1] : env_or(APERTURE_ENV_SCENARIO, "default");
    report_open();
    report_hello();
    if (strcmp(scenario, "probe") == 0) {
        report_done();
        return 0;
    }
    if (strcmp(scenario, "hang") == 0)
        for (;;)
            pause();
    modules_check();
    if (strcmp(scenario, "default") == 0) {
        scenario_nvdimm();
        scenario_dax(0);
        scenario_aperture(0);
        scenario_p2pmem();
        scenario_witness();
    } else if (strcmp(scenario, "idle") == 0) {
        /* aperture up: configure DAX, say so, and stay up for interactive use */
        scenario_nvdimm();
        scenario_dax(2);
        report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"idle\"}");
        scenario_serve(); /* never returns */
    } else if (strcmp(scenario, "remap") == 0) {
        scenario_nvdimm();
        scenario_remap();
    } else if (strcmp(scenario, "bench-device") == 0) {
        scenario_dax(2);
        scenario_aperture(1);
    } else if (strcmp(scenario, "nvdimm") == 0) {
        scenario_nvdimm();
    } else if (strcmp(scenario, "fuzz") == 0) {
        scenario_fuzz();
    } else if (strcmp(scenario, "bench-dax") == 0) {
        scenario_dax(1);
    } else {
        report_log("unknown scenario %s", scenario);
    }
    report_done();
    return 0;
}
