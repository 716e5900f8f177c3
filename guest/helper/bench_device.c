/* bench-device: MAP round trips and DMA throughput of device 0 (fixture devices). */
#define _GNU_SOURCE
#include "checks.h"
#include "device.h"
#include "report.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void bench_device(void)
{
    struct apdev *d = apdev_get(0);
    const struct daxmap *dx = devices_daxmap();
    if (!dx->map)
        report_log("bench-device: no devdax mapping; 2 MiB DMA figures skipped");
    enum { N = 1000 };
    static double rtt[N];
    char line[768];
    /* MAP round trip: alternate two pages in slot 0 (each MAP writes back one slot and loads another). */
    apdev_map(d, 0, 0);
    for (int i = 0; i < N; i++) {
        double t0 = now_s();
        apdev_map(d, 0, (uint64_t)(1 + (i & 1)));
        rtt[i] = (now_s() - t0) * 1e6;
    }
    apdev_unmap(d, 0);
    qsort(rtt, N, sizeof(rtt[0]), cmp_double);
    /* 2 MiB descriptors, device-local -> devdax, 32 per doorbell. */
    struct aperture_desc descs[32];
    struct aperture_compl out[32];
    double mbps_2m = 0, mbps_4k = 0, desc_4k = 0;
    if (dx->map && dx->size >= 96 * MIB) {
        for (int i = 0; i < 32; i++)
            descs[i] = (struct aperture_desc){.opcode = APERTURE_OP_DMA, .flags = APERTURE_DMA_SRC_LOCAL,
                                              .src = (uint64_t)(i % apdev_exposable_pages(d)) * d->slot,
                                              .dst = dx->phys + 16 * MIB + (uint64_t)i * 2 * MIB, .length = 2 * MIB};
        double t0 = 0, bytes = 0;
        for (int r = 0; r < 5; r++) { /* round 0 warms the host's mappings (first-touch faults) */
            if (r == 1)
                t0 = now_s();
            for (int i = 0; i < 32; i++)
                descs[i].tag = 0;
            if (apdev_submit(d, descs, 32, out) == 0 && r > 0)
                bytes += 32.0 * 2 * MIB;
        }
        mbps_2m = bytes / (now_s() - t0) / 1e6;
    }
    /* 4 KiB descriptors batched in one DMA_LIST of 1024 entries: RAM pages -> device memory. */
    struct rambuf data = {0}, table = {0};
    if (ram_alloc(&data, 1024) == 0 && ram_alloc(&table, 8) == 0) {
        int contiguous = 1;
        for (int i = 1; i < 8; i++)
            contiguous &= table.phys[i] == table.phys[0] + (unsigned long long)i * 4096;
        size_t entries = contiguous ? 1024 : 128;
        struct aperture_list_entry *ents = (struct aperture_list_entry *)table.buf;
        uint64_t scratch = scratch_page(d, 0) == UINT64_MAX ? 0 : scratch_page(d, 0);
        for (size_t i = 0; i < entries; i++)
            ents[i] = (struct aperture_list_entry){.src = data.phys[i], .dst = scratch * d->slot + (i * 4096) % d->slot,
                                                   .length = 4096, .flags = APERTURE_DMA_DST_LOCAL};
        double t0 = 0, n = 0;
        for (int r = 0; r < 21; r++) { /* round 0: warm-up */
            if (r == 1)
                t0 = now_s();
            if (apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                                              .length = entries}, NULL) == 0 && r > 0)
                n += (double)entries;
        }
        double dt = now_s() - t0;
        desc_4k = n / dt;
        mbps_4k = n * 4096 / dt / 1e6;
    }
    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_FIGURES "\",\"values\":{\"map_rtt_us_p50\":%.2f,\"map_rtt_us_p99\":%.2f,"
             "\"map_rtt_us_min\":%.2f,\"dma_2m_MBps\":%.1f,\"dma_4k_MBps\":%.1f,\"dma_4k_desc_per_s\":%.0f}}",
             rtt[N / 2], rtt[N * 99 / 100], rtt[0], mbps_2m, mbps_4k, desc_4k);
    report_line(line);
}
