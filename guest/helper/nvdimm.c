/* nvdimm.present: the NVDIMM regions the kernel found, with the physical address and size it sees. */
#include "checks.h"
#include "report.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int list_regions(struct region *out, int max)
{
    int n = 0;
    DIR *d = opendir("/sys/bus/nd/devices");
    struct dirent *e;
    while (d && (e = readdir(d)) && n < max) {
        char path[512], buf[64];
        if (strncmp(e->d_name, "region", 6) != 0)
            continue;
        snprintf(path, sizeof(path), "/sys/bus/nd/devices/%s/resource", e->d_name);
        if (read_text(path, buf, sizeof(buf)) != 0)
            continue;
        out[n].addr = strtoull(buf, NULL, 0);
        snprintf(path, sizeof(path), "/sys/bus/nd/devices/%s/size", e->d_name);
        if (read_text(path, buf, sizeof(buf)) != 0)
            continue;
        out[n].size = strtoull(buf, NULL, 0);
        snprintf(out[n].name, sizeof(out[n].name), "%s", e->d_name);
        n++;
    }
    if (d)
        closedir(d);
    return n;
}

static int by_addr(const void *a, const void *b)
{
    const struct region *x = a, *y = b;
    return x->addr < y->addr ? -1 : x->addr > y->addr;
}

int nd_regions(struct region *out, int max, int expected)
{
    int n = 0;
    /* Region devices are registered as the nfit driver probes; give them up to 5 s to appear. */
    for (int i = 0; i < 500; i++) {
        n = list_regions(out, max);
        if (n >= expected)
            break;
        usleep(10000);
    }
    qsort(out, (size_t)n, sizeof(*out), by_addr);
    return n;
}

static void check_present(void)
{
    int expected = atoi(env_or(APERTURE_ENV_PMEM, "1"));
    struct region regions[MAX_REGIONS];
    int n = nd_regions(regions, MAX_REGIONS, expected);
    struct jbuf jb;
    jb_init(&jb);
    jb_printf(&jb, "{\"expected\":%d,\"regions\":[", expected);
    for (int i = 0; i < n; i++) {
        jb_printf(&jb, "%s{\"name\":", i ? "," : "");
        jb_str(&jb, regions[i].name);
        jb_printf(&jb, ",\"addr\":%llu,\"size\":%llu}", regions[i].addr, regions[i].size);
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_NVDIMM_PRESENT, n == expected && n > 0, jb.buf);
}

TEST(check_nvdimm_present, .name = APERTURE_CHECK_NVDIMM_PRESENT, .fn = check_present, .order = 30,
     .tags = TAG_DEFAULT | TAG_NVDIMM | TAG_REMAP);
