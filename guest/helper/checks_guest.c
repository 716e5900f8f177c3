/* guest.modules, guest.shares: what /init could not load or mount (reported only when something failed). */
#include "checks.h"
#include "report.h"

/* /init lists what failed in a file, space separated; an empty or missing file means all went well. */
static void report_failures(const char *list, const char *check)
{
    char failed[4096];
    struct jbuf jb;

    if (read_text(list, failed, sizeof(failed)) != 0 || !failed[0])
        return;
    jb_init(&jb);
    jb_printf(&jb, "{\"failed\":");
    jb_str(&jb, failed);
    jb_printf(&jb, "}");
    report_check(check, 0, jb.buf);
}

static void check_modules(void)
{
    report_failures("/run/modules.failed", APERTURE_CHECK_GUEST_MODULES);
}

static void check_shares(void)
{
    report_failures("/run/shares.failed", APERTURE_CHECK_GUEST_SHARES);
}

TEST(check_guest_modules, .name = APERTURE_CHECK_GUEST_MODULES, .fn = check_modules, .order = 10,
     .tags = TAG_DEFAULT | TAG_NVDIMM | TAG_REMAP | TAG_FUZZ);
TEST(check_guest_shares, .name = APERTURE_CHECK_GUEST_SHARES, .fn = check_shares, .order = 20,
     .tags = TAG_DEFAULT | TAG_NVDIMM);
