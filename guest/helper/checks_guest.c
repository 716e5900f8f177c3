/* guest.modules, guest.shares: what /init could not load or mount. */
#include "checks.h"
#include "report.h"

static void check_modules(void)
{
    char failed[4096];
    struct jbuf jb;

    /* /init lists modules that insmod refused; an empty or missing file means all loaded (nothing to report). */
    if (read_text("/run/modules.failed", failed, sizeof(failed)) != 0 || !failed[0])
        return;
    jb_init(&jb);
    jb_printf(&jb, "{\"failed\":");
    jb_str(&jb, failed);
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_GUEST_MODULES, 0, jb.buf);
}

const struct check check_guest_modules = {.name = APERTURE_CHECK_GUEST_MODULES, .fn = check_modules};

static void check_shares(void)
{
    char failed[4096];
    struct jbuf jb;

    /* /init lists the --share directories it could not mount; reported only when there are some. */
    if (read_text("/run/shares.failed", failed, sizeof(failed)) != 0 || !failed[0])
        return;
    jb_init(&jb);
    jb_printf(&jb, "{\"failed\":");
    jb_str(&jb, failed);
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_GUEST_SHARES, 0, jb.buf);
}

const struct check check_guest_shares = {.name = APERTURE_CHECK_GUEST_SHARES, .fn = check_shares};
