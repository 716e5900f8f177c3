/* aperture-helper: runs inside the guest as /init's payload and reports JSON lines to the host.
 * Usage: aperture-helper [SCENARIO]   (default: $aperture_scenario, else "default"; scenarios.c lists them)
 *        aperture-helper list SCENARIO   the checks SCENARIO runs (after $aperture_only/$aperture_skip), in order
 * Tools (print to stdout, for `exec` in a live guest): see tools.c.
 */
#include "harness.h"
#include "report.h"

#include <string.h>

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "list")) {
        const struct scenario *listed = scenario_find(argv[2]);

        if (listed)
            harness_list(listed);
        return listed ? 0 : 2;
    }
    int tool = helper_tool(argc, argv);
    if (tool >= 0)
        return tool;
    const char *name = argc > 1 ? argv[1] : env_or(APERTURE_ENV_SCENARIO, "default");
    const struct scenario *s = scenario_find(name);
    report_open();
    report_hello();
    if (s)
        harness_run(s);
    else
        report_log("unknown scenario %s", name);
    if (s && s->serve_after) {
        shell_start();
        report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_IDLE "\"}");
        scenario_serve(); /* never returns */
    }
    report_done();
    return 0;
}
