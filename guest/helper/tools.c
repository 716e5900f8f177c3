/* Command-line tools for a live guest (`aperture exec NAME -- aperture-helper TOOL ...`), printing to stdout:
 *   info | map DEV SLOT PAGE | unmap DEV SLOT | dma DEV SRC DST LEN [FLAGS] | peek DEV SLOT OFF LEN |
 *   poke DEV SLOT OFF HEX | flood DEV N SECONDS
 */
#define _GNU_SOURCE
#include "device.h"
#include "report.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned long long num(const char *s) { return strtoull(s, NULL, 0); }

static struct apdev *tool_dev(const char *idx)
{
    int n = apdev_discover();
    int i = (int)num(idx);
    if (i < 0 || i >= n) {
        fprintf(stderr, "no aperture device %s (found %d)\n", idx, n);
        return NULL;
    }
    return apdev_get(i);
}

/* flood DEV N SECONDS: queue N DMA_LISTs of MAX_LIST_BYTES each (device-local, so the host copies inside device
 * memory) behind one doorbell, without waiting, then keep the list table alive for SECONDS. Tests that the host
 * serves such work in bounded rounds (a stop is never stuck behind it). */
static int flood(struct apdev *d, uint32_t n, unsigned seconds)
{
    static struct rambuf table;
    const uint64_t entry = APERTURE_MAX_DMA_LENGTH, entries = APERTURE_MAX_LIST_BYTES / APERTURE_MAX_DMA_LENGTH;

    if (n == 0 || n > APERTURE_RING_ENTRIES || d->devmem < 2 * entry || ram_alloc(&table, 1) != 0)
        return 2;
    for (uint64_t i = 0; i < entries; i++) {
        uint64_t *e = (uint64_t *)(table.buf + i * 32);
        e[0] = 0;                  /* src: device offset 0 */
        e[1] = d->devmem - entry;  /* dst: the last MAX_DMA_LENGTH of device memory */
        e[2] = entry;
        e[3] = APERTURE_DMA_SRC_LOCAL | APERTURE_DMA_DST_LOCAL; /* flags, reserved = 0 */
    }
    for (uint32_t i = 0; i < n; i++) {
        struct aperture_desc desc = {.opcode = APERTURE_OP_DMA_LIST, .tag = apdev_next_tag(), .src = table.phys[0],
                                     .length = entries};
        memcpy((void *)(d->ctl + APERTURE_REG_SQ + ((d->sq_head + i) % APERTURE_RING_ENTRIES) * 64), &desc,
               sizeof(desc));
    }
    __sync_synchronize();
    d->sq_head += n;
    apdev_w32(d, APERTURE_REG_SQ_HEAD, d->sq_head);
    __sync_synchronize();
    apdev_doorbell(d);
    printf("queued %u DMA_LIST descriptors, %llu MiB of copying\n", n,
           (unsigned long long)n * APERTURE_MAX_LIST_BYTES >> 20);
    fflush(stdout);
    sleep(seconds);
    return 0;
}

int helper_tool(int argc, char **argv)
{
    if (argc < 2)
        return -1;
    const char *t = argv[1];
    struct apdev *d;
    int st;
    if (!strcmp(t, "info") && argc == 2) {
        int n = apdev_discover();
        for (int i = 0; i < n; i++)
            printf("device %d: ctl %s window %s @ %#llx, %u slots of %#llx, %u pages\n", apdev_get(i)->index,
                   apdev_get(i)->ctl_bdf, apdev_get(i)->win_bdf, apdev_get(i)->win_phys, apdev_get(i)->nr_slots,
                   (unsigned long long)apdev_get(i)->slot, apdev_get(i)->nr_pages);
        return n > 0 ? 0 : 1;
    }
    if (!strcmp(t, "map") && argc == 5 && (d = tool_dev(argv[2]))) {
        st = apdev_map(d, (uint32_t)num(argv[3]), num(argv[4]));
    } else if (!strcmp(t, "unmap") && argc == 4 && (d = tool_dev(argv[2]))) {
        st = apdev_unmap(d, (uint32_t)num(argv[3]));
    } else if (!strcmp(t, "dma") && (argc == 6 || argc == 7) && (d = tool_dev(argv[2]))) {
        st = apdev_dma(d, num(argv[3]), num(argv[4]), num(argv[5]), argc == 7 ? (uint16_t)num(argv[6]) : 0);
    } else if (!strcmp(t, "flood") && argc == 5 && (d = tool_dev(argv[2]))) {
        return flood(d, (uint32_t)num(argv[3]), (unsigned)num(argv[4]));
    } else if (!strcmp(t, "peek") && argc == 6 && (d = tool_dev(argv[2]))) {
        uint64_t slot = num(argv[3]), off = num(argv[4]), len = num(argv[5]);
        if (slot >= d->nr_slots || off + len > d->slot || len > 4096) {
            fprintf(stderr, "peek: out of range\n");
            return 2;
        }
        for (uint64_t i = 0; i < len; i++)
            printf("%02x", d->win[slot * d->slot + off + i]);
        printf("\n");
        return 0;
    } else if (!strcmp(t, "poke") && argc == 6 && (d = tool_dev(argv[2]))) {
        uint64_t slot = num(argv[3]), off = num(argv[4]);
        size_t len = strlen(argv[5]) / 2;
        if (slot >= d->nr_slots || off + len > d->slot) {
            fprintf(stderr, "poke: out of range\n");
            return 2;
        }
        for (size_t i = 0; i < len; i++) {
            char byte[3] = {argv[5][2 * i], argv[5][2 * i + 1], 0};
            d->win[slot * d->slot + off + i] = (uint8_t)strtoul(byte, NULL, 16);
        }
        return 0;
    } else if (!strcmp(t, "map") || !strcmp(t, "unmap") || !strcmp(t, "dma") || !strcmp(t, "peek") ||
               !strcmp(t, "poke") || !strcmp(t, "info") || !strcmp(t, "flood")) {
        fprintf(stderr, "usage: aperture-helper info | map DEV SLOT PAGE | unmap DEV SLOT | "
                        "dma DEV SRC DST LEN [FLAGS] | peek DEV SLOT OFF LEN | poke DEV SLOT OFF HEX | "
                        "flood DEV N SECONDS\n");
        return 2;
    } else {
        return -1;
    }
    printf("%s\n", st < 0 ? "TIMEOUT" : aperture_status_name((unsigned)st));
    return st == 0 ? 0 : 1;
}
