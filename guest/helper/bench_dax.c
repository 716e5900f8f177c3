/* bench-dax: memcpy bandwidth into RAM, a devdax mapping and an fsdax file mapping (fixture dax). */
#define _GNU_SOURCE
#include "checks.h"
#include "device.h"
#include "report.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static double memcpy_mbps(char *dst, const char *src, size_t len)
{
    double t0 = now_s(), t;
    size_t bytes = 0;
    do {
        memcpy(dst, src, len);
        bytes += len;
        t = now_s();
    } while (t - t0 < 0.2);
    return (double)bytes / (t - t0) / 1e6;
}

void bench_dax(void)
{
    struct dax_mappings m = dax_mappings();
    const size_t len = 1 * MIB;
    char line[256];
    /* Anonymous RAM on 2 MiB-aligned, THP-advised buffers: DAX mappings use 2 MiB pages, so compare like
     * with like (under TCG, 4 KiB pages alone halve memcpy bandwidth through the soft-MMU). */
    char *src = aligned_alloc(2 * MIB, 2 * MIB), *ram = aligned_alloc(2 * MIB, 2 * MIB);
    if (!src || !ram)
        return;
    madvise(src, 2 * MIB, MADV_HUGEPAGE);
    madvise(ram, 2 * MIB, MADV_HUGEPAGE);
    memset(src, 0x5a, len);
    memset(ram, 0, len);
    /* Interleaved rounds, best of three per target: TCG warm-up and host noise hit every target alike. */
    double r = 0, d = 0, f = 0;
    for (int round = 0; round < 3; round++) {
        double x = memcpy_mbps(ram, src, len);
        r = x > r ? x : r;
        x = m.devdax ? memcpy_mbps(m.devdax + 4 * MIB, src, len) : 0;
        d = x > d ? x : d;
        x = m.fsdax_file ? memcpy_mbps(m.fsdax_file, src, len) : 0;
        f = x > f ? x : f;
    }
    char thp[64] = "?";
    read_text("/sys/kernel/mm/transparent_hugepage/enabled", thp, sizeof(thp));
    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_FIGURES "\",\"values\":{\"memcpy_ram_MBps\":%.1f,"
             "\"memcpy_devdax_MBps\":%.1f,\"memcpy_fsdax_MBps\":%.1f}}", r, d, f);
    report_log("bench-dax: transparent_hugepage %s", thp);
    report_line(line);
    free(src);
    free(ram);
}
