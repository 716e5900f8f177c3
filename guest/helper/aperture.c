/* The aperture device from the guest: discovery, the window (map/remap/verify), non-exposable pages,
 * P2P DMA (pmem <-> device, RAM <-> device, device -> peer window) and hostile descriptors.
 *
 * Checks: aperture.window, aperture.hidden_refused, aperture.bad_descriptors, p2p.pmem_to_device,
 * p2p.device_to_pmem, p2p.ram_to_device, p2p.device_to_device. Every write to device memory is reported
 * ("written") so the host can verify device memory after the run.
 */
#define _GNU_SOURCE
#include "aperture_abi.h"
#include "report.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)

struct apdev {
    int index;
    char ctl_bdf[256], win_bdf[256];
    volatile uint8_t *ctl;
    volatile uint32_t *regs; /* ivshmem BAR0: IntrMask, IntrStatus, IVPosition, Doorbell */
    uint8_t *win;
    unsigned long long ctl_phys, win_phys, win_size;
    uint64_t devmem, slot;
    uint32_t nr_slots, nr_pages, sq_head, cq_tail;
    uint64_t hidden_start, hidden_end;
};

static struct apdev devs[APERTURE_MAX_DEVICES];
static int ndevs;
static uint32_t next_tag = 1;

/* ---------------------------------------------------------------- register access */
static inline uint32_t r32(struct apdev *d, unsigned off) { return *(volatile uint32_t *)(d->ctl + off); }
static inline uint64_t r64(struct apdev *d, unsigned off) { return *(volatile uint64_t *)(d->ctl + off); }
static inline void w32(struct apdev *d, unsigned off, uint32_t v) { *(volatile uint32_t *)(d->ctl + off) = v; }

/* ---------------------------------------------------------------- discovery */
static int bar_range(const char *bdf, int bar, unsigned long long *start, unsigned long long *size)
{
    char path[256], text[2048], *line = text;
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource", bdf);
    if (read_text(path, text, sizeof(text)) != 0)
        return -1;
    for (int i = 0; i < bar && line; i++)
        line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL;
    if (!line)
        return -1;
    unsigned long long s = strtoull(line, &line, 0), e = strtoull(line, NULL, 0);
    if (!s || e <= s)
        return -1;
    *start = s;
    *size = e - s + 1;
    return 0;
}

static void *map_bar(const char *bdf, int bar, size_t size)
{
    char path[256];
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource%d", bdf, bar);
    int fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

/* The window device: on bus 0 at WINDOW_PCI_SLOT, or (hotplug topology) the function behind the root port
 * there. Hot-added devices get BARs but no memory decoding until enabled: write sysfs `enable`. */
static int map_window(struct apdev *d, double wait_s)
{
    char port[64], path[512], cls[32], child[256] = "";
    double deadline = now_s() + wait_s;
    snprintf(port, sizeof(port), "0000:00:%02x.0", r32(d, APERTURE_REG_WINDOW_PCI_SLOT));
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/class", port);
    int bridge = read_text(path, cls, sizeof(cls)) == 0 && !strncmp(cls, "0x0604", 6);
    if (d->win) {
        munmap(d->win, d->win_size);
        d->win = NULL;
    }
    for (;;) {
        if (!bridge) {
            snprintf(d->win_bdf, sizeof(d->win_bdf), "%s", port);
        } else {
            DIR *pd;
            struct dirent *ce;
            child[0] = 0;
            snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", port);
            if ((pd = opendir(path))) {
                while ((ce = readdir(pd))) /* DDDD:BB:SS.F, not the port's service devices (…:pcie001) */
                    if (!strncmp(ce->d_name, "0000:", 5) && strlen(ce->d_name) == 12)
                        snprintf(child, sizeof(child), "%s", ce->d_name);
                closedir(pd);
            }
            snprintf(d->win_bdf, sizeof(d->win_bdf), "%s", child);
        }
        if (d->win_bdf[0] && bar_range(d->win_bdf, 2, &d->win_phys, &d->win_size) == 0) {
            if (bridge) {
                snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/enable", d->win_bdf);
                char en[8];
                if (read_text(path, en, sizeof(en)) == 0 && en[0] == '0')
                    write_text(path, "1");
            }
            d->win = map_bar(d->win_bdf, 2, d->win_size);
            if (d->win)
                return 0;
        }
        if (now_s() >= deadline)
            return -1;
        usleep(2000);
    }
}

static int by_index(const void *a, const void *b)
{
    return ((const struct apdev *)a)->index - ((const struct apdev *)b)->index;
}

static int discover(void)
{
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    ndevs = 0;
    while (dir && (e = readdir(dir)) && ndevs < APERTURE_MAX_DEVICES) {
        char path[512], v[32], dv[32];
        unsigned long long start, size;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if (read_text(path, v, sizeof(v)) || strcmp(v, "0x1af4"))
            continue;
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
        if (read_text(path, dv, sizeof(dv)) || strcmp(dv, "0x1110"))
            continue;
        if (bar_range(e->d_name, 2, &start, &size) || size < APERTURE_CTL_SIZE)
            continue;
        volatile uint8_t *ctl = map_bar(e->d_name, 2, APERTURE_CTL_SIZE);
        if (!ctl)
            continue;
        if (*(volatile uint32_t *)ctl != APERTURE_MAGIC ||
            (*(volatile uint32_t *)(ctl + APERTURE_REG_ABI_VERSION) >> 16) != APERTURE_ABI_MAJOR) {
            munmap((void *)ctl, APERTURE_CTL_SIZE);
            continue;
        }
        struct apdev *d = &devs[ndevs];
        memset(d, 0, sizeof(*d));
        d->ctl = ctl;
        d->ctl_phys = start;
        snprintf(d->ctl_bdf, sizeof(d->ctl_bdf), "%s", e->d_name);
        d->index = (int)r32(d, APERTURE_REG_DEVICE_INDEX);
        d->devmem = r64(d, APERTURE_REG_DEVMEM_SIZE);
        d->slot = r64(d, APERTURE_REG_SLOT_SIZE);
        d->nr_slots = r32(d, APERTURE_REG_NR_SLOTS);
        d->nr_pages = (uint32_t)(d->devmem / d->slot);
        d->sq_head = r32(d, APERTURE_REG_SQ_HEAD);
        d->cq_tail = r32(d, APERTURE_REG_CQ_TAIL);
        if (r32(d, APERTURE_REG_NR_HIDDEN) > 0) {
            d->hidden_start = r64(d, APERTURE_REG_HIDDEN);
            d->hidden_end = r64(d, APERTURE_REG_HIDDEN + 8);
        }
        d->regs = map_bar(e->d_name, 0, 4096);
        map_window(d, 0.0);
        if (d->regs && d->win)
            ndevs++;
    }
    if (dir)
        closedir(dir);
    qsort(devs, (size_t)ndevs, sizeof(devs[0]), by_index);
    return ndevs;
}

/* ---------------------------------------------------------------- rings */
/* Submit n descriptors with one doorbell and wait for their n completions (5 s). Returns 0 or -1 on timeout.
 * Completions are matched by tag: one left over from an earlier submission that timed out is drained, never
 * taken for the answer to a later descriptor. */
static unsigned long long stale_completions;

static int submit(struct apdev *d, struct aperture_desc *descs, int n, struct aperture_compl *out)
{
    for (int i = 0; i < n; i++) {
        if (!descs[i].tag)
            descs[i].tag = next_tag++;
        memcpy((void *)(d->ctl + APERTURE_REG_SQ + ((d->sq_head + (uint32_t)i) % APERTURE_RING_ENTRIES) * 64),
               &descs[i], sizeof(descs[i]));
    }
    __sync_synchronize();
    d->sq_head += (uint32_t)n;
    w32(d, APERTURE_REG_SQ_HEAD, d->sq_head);
    __sync_synchronize();
    d->regs[3] = 0; /* Doorbell: peer 0 (the emulator), vector 0 */
    double deadline = now_s() + 5.0;
    for (int got = 0; got < n;) {
        if (r32(d, APERTURE_REG_CQ_HEAD) == d->cq_tail) {
            if (now_s() > deadline)
                return -1;
            __builtin_ia32_pause();
            continue;
        }
        __sync_synchronize();
        memcpy(&out[got], (const void *)(d->ctl + APERTURE_REG_CQ + (d->cq_tail % APERTURE_RING_ENTRIES) * 16),
               sizeof(out[got]));
        d->cq_tail++;
        w32(d, APERTURE_REG_CQ_TAIL, d->cq_tail);
        if (out[got].tag != descs[got].tag) {
            stale_completions++;
            continue;
        }
        got++;
    }
    return 0;
}

static int cmd(struct apdev *d, struct aperture_desc desc, uint64_t *result)
{
    struct aperture_compl c;
    if (submit(d, &desc, 1, &c) != 0)
        return -1;
    if (result)
        *result = c.result;
    return c.status;
}

static int map_page(struct apdev *d, uint32_t slot, uint64_t page)
{
    return cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_MAP, .slot = slot, .page = page}, NULL);
}

static int unmap_slot(struct apdev *d, uint32_t slot)
{
    return cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_UNMAP, .slot = slot}, NULL);
}

static int dma(struct apdev *d, uint64_t src, uint64_t dst, uint64_t len, uint16_t flags)
{
    return cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA, .flags = flags, .src = src, .dst = dst,
                                         .length = len}, NULL);
}

/* Seqlock read of one slot-table entry; counts retries (odd or changed generation). */
static uint64_t slot_entry(struct apdev *d, uint32_t slot, unsigned *retries)
{
    for (;;) {
        uint32_t g1 = r32(d, APERTURE_REG_GENERATION);
        __sync_synchronize();
        uint64_t v = r64(d, APERTURE_REG_SLOT_TABLE + 8 * slot);
        __sync_synchronize();
        if (!(g1 & 1) && g1 == r32(d, APERTURE_REG_GENERATION))
            return v;
        if (retries)
            (*retries)++;
    }
}

/* Write a pattern into a device page through the window (map into slot, write, leave mapped). */
static int fill_page(struct apdev *d, uint32_t slot, uint64_t page, size_t len, uint32_t seed)
{
    if (map_page(d, slot, page) != APERTURE_ST_OK)
        return -1;
    pattern_fill(d->win + slot * d->slot, len, seed);
    return 0;
}

/* ---------------------------------------------------------------- written-log for the host */
static struct jbuf written;
static int nwritten;

static void record(struct apdev *d, uint64_t offset, uint64_t len, uint32_t seed)
{
    jb_printf(&written, "%s{\"device\":%d,\"offset\":%llu,\"len\":%llu,\"seed\":%u}", nwritten++ ? "," : "",
              d->index, (unsigned long long)offset, (unsigned long long)len, seed);
}

/* ---------------------------------------------------------------- page budget */
/* Pages the guest may map: up to the first hidden page. */
static uint64_t exposable_pages(struct apdev *d)
{
    return d->hidden_end > d->hidden_start && d->hidden_start / d->slot < d->nr_pages ? d->hidden_start / d->slot
                                                                                      : d->nr_pages;
}

/* The window check cycles through more pages than slots (when the device has them). */
static uint32_t window_pages(struct apdev *d)
{
    uint64_t want = d->nr_slots + 3ull, have = exposable_pages(d);
    return (uint32_t)(want < have ? want : have);
}

/* Scratch page k for the DMA checks: after the window check's pages, or UINT64_MAX if the device is too small. */
static uint64_t scratch_page(struct apdev *d, unsigned k)
{
    uint64_t p = window_pages(d) + k;
    return p < exposable_pages(d) ? p : UINT64_MAX;
}

static size_t chunk(struct apdev *d, size_t want) { return want < d->slot ? want : (size_t)d->slot; }

/* ---------------------------------------------------------------- devdax for P2P */
struct daxmap {
    uint8_t *map;
    size_t size;
    unsigned long long phys;            /* of map[0] */
    unsigned long long region_end;      /* end of the NVDIMM region holding it */
};

static int open_devdax(struct daxmap *dx)
{
    char name[256] = "", path[512], buf[64];
    DIR *d = opendir("/sys/bus/dax/devices");
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (!strncmp(e->d_name, "dax", 3))
            snprintf(name, sizeof(name), "%s", e->d_name);
    if (d)
        closedir(d);
    if (!name[0])
        return -1;
    snprintf(path, sizeof(path), "/sys/bus/dax/devices/%s/size", name);
    if (read_text(path, buf, sizeof(buf)))
        return -1;
    dx->size = strtoull(buf, NULL, 0);
    snprintf(path, sizeof(path), "/dev/%s", name);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -1;
    void *m = mmap(NULL, dx->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return -1;
    dx->map = m;
    *(volatile uint8_t *)dx->map = *(volatile uint8_t *)dx->map;
    dx->phys = virt_to_phys(dx->map);
    /* region end: the region whose [resource, +size) contains phys */
    struct region regions[MAX_REGIONS];
    int n = nd_regions(regions, MAX_REGIONS, 1);
    for (int i = 0; i < n; i++)
        if (regions[i].addr <= dx->phys && dx->phys < regions[i].addr + regions[i].size)
            dx->region_end = regions[i].addr + regions[i].size;
    return dx->phys ? 0 : -1;
}

/* RAM: n 4 KiB pages, locked, with their physical addresses. */
struct rambuf {
    uint8_t *buf;
    size_t pages;
    unsigned long long phys[1024];
};

static int ram_alloc(struct rambuf *r, size_t pages)
{
    if (pages > 1024)
        return -1;
    r->pages = pages;
    r->buf = aligned_alloc(4096, pages * 4096);
    if (!r->buf)
        return -1;
    memset(r->buf, 0, pages * 4096);
    mlock(r->buf, pages * 4096);
    for (size_t i = 0; i < pages; i++)
        if (!(r->phys[i] = virt_to_phys(r->buf + i * 4096)))
            return -1;
    return 0;
}

/* ---------------------------------------------------------------- checks */
static int check_window(struct apdev *d, struct jbuf *out)
{
    int ok = 1, survived = 0, total = 0;
    unsigned retries = 0;
    const size_t len = chunk(d, 64 * KIB);
    uint32_t pages = window_pages(d); /* more pages than slots: every slot gets remapped */
    for (uint32_t s = 0; s < d->nr_slots; s++)
        ok &= slot_entry(d, s, &retries) == 0;
    int empty_at_start = ok;
    /* Write a pattern into each page through whichever slot it lands in. */
    for (uint32_t p = 0; p < pages && ok; p++) {
        ok &= fill_page(d, p % d->nr_slots, p, len, 100 + p) == 0;
        record(d, p * d->slot, len, 100 + p);
    }
    /* Map each back through a different slot and check it survived the remaps. */
    for (uint32_t p = 0; p < pages && ok; p++) {
        uint32_t slot = (p + 1) % d->nr_slots;
        total++;
        if (slot != p % d->nr_slots) /* make room: the page may still be live in another slot */
            for (uint32_t s2 = 0; s2 < d->nr_slots; s2++)
                if (s2 != slot && slot_entry(d, s2, &retries) == p + 1)
                    unmap_slot(d, s2);
        if (map_page(d, slot, p) != APERTURE_ST_OK) {
            ok = 0;
            break;
        }
        ok &= slot_entry(d, slot, &retries) == p + 1;
        if (pattern_check(d->win + slot * d->slot, len, 100 + p))
            survived++;
    }
    /* One page can only be live in one slot. */
    int busy = -1;
    if (ok) {
        for (uint32_t s = 0; s < d->nr_slots; s++)
            unmap_slot(d, s);
        map_page(d, 0, 0);
        busy = d->nr_slots > 1 ? map_page(d, 1, 0) : APERTURE_ST_EBUSY;
    }
    uint32_t gen = r32(d, APERTURE_REG_GENERATION);
    for (uint32_t s = 0; s < d->nr_slots; s++)
        unmap_slot(d, s);
    ok = ok && empty_at_start && survived == total && busy == APERTURE_ST_EBUSY && !(gen & 1);
    jb_printf(out, "{\"device\":%d,\"ctl\":\"%s\",\"window\":\"%s\",\"window_phys\":%llu,\"window_size\":%llu,"
              "\"slot_size\":%llu,\"nr_slots\":%u,\"pages_cycled\":%u,\"survived\":%d,\"of\":%d,"
              "\"double_map\":\"%s\",\"generation\":%u,\"seqlock_retries\":%u}", d->index, d->ctl_bdf, d->win_bdf,
              d->win_phys, d->win_size, (unsigned long long)d->slot, d->nr_slots, pages, survived, total,
              busy >= 0 ? aperture_status_name((unsigned)busy) : "not run", gen, retries);
    return ok;
}

static void check_hidden(struct apdev *d, struct daxmap *dx)
{
    struct jbuf jb;
    jb_init(&jb);
    if (d->hidden_end <= d->hidden_start) {
        report_log("aperture.hidden_refused not run: device 0 has no non-exposable range");
        return;
    }
    uint64_t page = d->hidden_start / d->slot;
    int map_st = map_page(d, 0, page);
    int last_st = map_page(d, 0, (d->hidden_end / d->slot) - 1);
    /* The device's own DMA still reaches hidden memory: pmem -> hidden -> pmem round trip. */
    int dma_in = -1, dma_out = -1, back = 0;
    if (dx->map && dx->size >= 16 * MIB) {
        pattern_fill(dx->map + 12 * MIB, 64 * KIB, 301);
        flush_range(dx->map + 12 * MIB, 64 * KIB);
        memset(dx->map + 13 * MIB, 0, 64 * KIB);
        flush_range(dx->map + 13 * MIB, 64 * KIB);
        dma_in = dma(d, dx->phys + 12 * MIB, d->hidden_start, 64 * KIB, APERTURE_DMA_DST_LOCAL);
        dma_out = dma(d, d->hidden_start, dx->phys + 13 * MIB, 64 * KIB, APERTURE_DMA_SRC_LOCAL);
        back = pattern_check(dx->map + 13 * MIB, 64 * KIB, 301);
        record(d, d->hidden_start, 64 * KIB, 301);
    }
    int ok = map_st == APERTURE_ST_EACCES && last_st == APERTURE_ST_EACCES && dma_in == 0 && dma_out == 0 && back;
    jb_printf(&jb, "{\"device\":%d,\"hidden\":[%llu,%llu],\"map_first_hidden\":\"%s\",\"map_last_hidden\":\"%s\","
              "\"device_dma_into_hidden\":\"%s\",\"device_dma_out_of_hidden\":\"%s\",\"round_trip_ok\":%s}",
              d->index, (unsigned long long)d->hidden_start, (unsigned long long)d->hidden_end,
              aperture_status_name((unsigned)map_st), aperture_status_name((unsigned)last_st),
              dma_in < 0 ? "timeout" : aperture_status_name((unsigned)dma_in),
              dma_out < 0 ? "timeout" : aperture_status_name((unsigned)dma_out), back ? "true" : "false");
    report_check(APERTURE_CHECK_APERTURE_HIDDEN_REFUSED, ok, jb.buf);
}

static void check_pmem_device(struct apdev *d, struct daxmap *dx)
{
    const size_t len = chunk(d, 1 * MIB);
    char detail[512];
    uint64_t pin = scratch_page(d, 0), pout = scratch_page(d, 1);
    if (!dx->map) {
        report_log("p2p.pmem_to_device and p2p.device_to_pmem not run: no devdax NVDIMM in this topology");
        return;
    }
    if (pout == UINT64_MAX || dx->size < 12 * MIB) {
        report_log("p2p.pmem_to_device and p2p.device_to_pmem not run: device or devdax too small");
        return;
    }
    /* pmem -> device page 40 */
    pattern_fill(dx->map + 8 * MIB, len, 201);
    flush_range(dx->map + 8 * MIB, len);
    int st = dma(d, dx->phys + 8 * MIB, pin * d->slot, len, APERTURE_DMA_DST_LOCAL);
    int ok = st == 0 && map_page(d, 2 % d->nr_slots, pin) == 0 &&
             pattern_check(d->win + (2 % d->nr_slots) * d->slot, len, 201);
    unmap_slot(d, 2 % d->nr_slots);
    record(d, pin * d->slot, len, 201);
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"src_phys\":%llu,\"dst_device_offset\":%llu,\"len\":%zu,"
             "\"status\":\"%s\",\"verified_through_window\":%s}", d->index, dx->phys + 8 * MIB,
             (unsigned long long)(pin * d->slot), len, st < 0 ? "timeout" : aperture_status_name((unsigned)st),
             ok ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_PMEM_TO_DEVICE, ok, detail);

    /* device page 41 (written through the window) -> pmem */
    ok = fill_page(d, 3 % d->nr_slots, pout, len, 202) == 0 && unmap_slot(d, 3 % d->nr_slots) == 0;
    record(d, pout * d->slot, len, 202);
    memset(dx->map + 10 * MIB, 0, len);
    flush_range(dx->map + 10 * MIB, len);
    st = dma(d, pout * d->slot, dx->phys + 10 * MIB, len, APERTURE_DMA_SRC_LOCAL);
    ok = ok && st == 0 && pattern_check(dx->map + 10 * MIB, len, 202);
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"src_device_offset\":%llu,\"dst_phys\":%llu,\"len\":%zu,"
             "\"status\":\"%s\",\"verified_in_devdax_mapping\":%s}", d->index, (unsigned long long)(pout * d->slot),
             dx->phys + 10 * MIB, len, st < 0 ? "timeout" : aperture_status_name((unsigned)st), ok ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_DEVICE_TO_PMEM, ok, detail);
}

static void check_ram_device(struct apdev *d)
{
    struct rambuf data = {0}, table = {0};
    char detail[512];
    const size_t pages = chunk(d, 64 * KIB) / 4096;
    uint64_t pr = scratch_page(d, 2);
    uint32_t rs = 4 % d->nr_slots;
    int st_in = -1, st_out = -1, ok_in = 0, ok_out = 0;
    if (pr == UINT64_MAX) {
        report_log("p2p.ram_to_device not run: device too small");
        return;
    }
    if (ram_alloc(&data, pages) == 0 && ram_alloc(&table, 1) == 0) {
        struct aperture_list_entry *ents = (struct aperture_list_entry *)table.buf;
        pattern_fill(data.buf, pages * 4096, 203);
        for (size_t i = 0; i < pages; i++)
            ents[i] = (struct aperture_list_entry){.src = data.phys[i], .dst = pr * d->slot + i * 4096,
                                                   .length = 4096, .flags = APERTURE_DMA_DST_LOCAL};
        st_in = cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                                              .length = pages}, NULL);
        ok_in = st_in == 0 && map_page(d, rs, pr) == 0 && pattern_check(d->win + rs * d->slot, pages * 4096, 203);
        unmap_slot(d, rs);
        record(d, pr * d->slot, pages * 4096, 203);
        memset(data.buf, 0, pages * 4096);
        for (size_t i = 0; i < pages; i++)
            ents[i] = (struct aperture_list_entry){.src = pr * d->slot + i * 4096, .dst = data.phys[i],
                                                   .length = 4096, .flags = APERTURE_DMA_SRC_LOCAL};
        st_out = cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                                               .length = pages}, NULL);
        ok_out = st_out == 0 && pattern_check(data.buf, pages * 4096, 203);
    }
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"pages\":%zu,\"list_phys\":%llu,\"ram_to_device\":\"%s\","
             "\"device_to_ram\":\"%s\",\"verified_in\":%s,\"verified_out\":%s}", d->index, pages, table.phys[0],
             st_in < 0 ? "timeout" : aperture_status_name((unsigned)st_in),
             st_out < 0 ? "timeout" : aperture_status_name((unsigned)st_out), ok_in ? "true" : "false",
             ok_out ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_RAM_TO_DEVICE, ok_in && ok_out, detail);
}

static void check_device_device(struct apdev *a, struct apdev *b)
{
    char detail[512];
    if (!b) {
        report_log("p2p.device_to_device not run: it needs two aperture devices");
        return;
    }
    const size_t len = chunk(a, chunk(b, 1 * MIB));
    uint64_t src = scratch_page(a, 3), dst = scratch_page(b, 4);
    uint32_t as = 5 % a->nr_slots, bs = 1 % b->nr_slots;
    if (src == UINT64_MAX || dst == UINT64_MAX) {
        report_log("p2p.device_to_device not run: device too small");
        return;
    }
    int ok = fill_page(a, as, src, len, 204) == 0 && unmap_slot(a, as) == 0;
    record(a, src * a->slot, len, 204);
    ok = ok && map_page(b, bs, dst) == 0;
    memset(b->win + bs * b->slot, 0, len);
    /* A's DMA engine writes into B's BAR window: lands in the page B's slot maps now. */
    int st = dma(a, src * a->slot, b->win_phys + bs * b->slot, len, APERTURE_DMA_SRC_LOCAL);
    int seen = pattern_check(b->win + bs * b->slot, len, 204);
    ok = ok && st == 0 && seen && unmap_slot(b, bs) == 0;
    record(b, dst * b->slot, len, 204);
    snprintf(detail, sizeof(detail), "{\"src_device\":%d,\"src_offset\":%llu,\"dst_device\":%d,\"dst_window_phys\":%llu,"
             "\"dst_page\":%llu,\"len\":%zu,\"status\":\"%s\",\"seen_in_peer_window\":%s}", a->index,
             (unsigned long long)(src * a->slot), b->index, b->win_phys + bs * b->slot, (unsigned long long)dst, len,
             st < 0 ? "timeout" : aperture_status_name((unsigned)st), seen ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_DEVICE_TO_DEVICE, ok, detail);
}

struct bad_case {
    const char *name;
    struct aperture_desc desc;
    int expect;
};

static void check_bad(struct apdev *d, struct daxmap *dx)
{
    struct jbuf jb;
    struct rambuf table = {0};
    int ok = 1;
    jb_init(&jb);
    ram_alloc(&table, 1);
    unmap_slot(d, d->nr_slots - 1);
    uint64_t dax_end = dx->region_end ? dx->region_end : dx->phys + dx->size;
    struct bad_case cases[] = {
        {"unknown opcode", {.opcode = 99}, APERTURE_ST_EINVAL},
        {"map slot out of range", {.opcode = APERTURE_OP_MAP, .slot = d->nr_slots, .page = 0}, APERTURE_ST_ERANGE},
        {"map slot 2^32-1", {.opcode = APERTURE_OP_MAP, .slot = 0xffffffffu, .page = 0}, APERTURE_ST_ERANGE},
        {"map page out of range", {.opcode = APERTURE_OP_MAP, .slot = 0, .page = d->nr_pages}, APERTURE_ST_ERANGE},
        {"map page 2^63", {.opcode = APERTURE_OP_MAP, .slot = 0, .page = 1ULL << 63}, APERTURE_ST_ERANGE},
        {"reserved field", {.opcode = APERTURE_OP_MAP, .slot = 0, .page = 1, .reserved0 = 1}, APERTURE_ST_EINVAL},
        {"flags on map", {.opcode = APERTURE_OP_MAP, .flags = 1, .slot = 0, .page = 1}, APERTURE_ST_EINVAL},
        {"unmap slot out of range", {.opcode = APERTURE_OP_UNMAP, .slot = 1000}, APERTURE_ST_ERANGE},
        {"dma zero length", {.opcode = APERTURE_OP_DMA, .src = table.phys[0], .dst = table.phys[0]}, APERTURE_ST_EINVAL},
        {"dma too long", {.opcode = APERTURE_OP_DMA, .src = 0, .dst = 0, .length = APERTURE_MAX_DMA_LENGTH + 1,
                          .flags = APERTURE_DMA_SRC_LOCAL | APERTURE_DMA_DST_LOCAL}, APERTURE_ST_ETOOBIG},
        {"dma unknown flags", {.opcode = APERTURE_OP_DMA, .src = 0, .dst = 0, .length = 4096, .flags = 0x80},
         APERTURE_ST_EINVAL},
        {"dma to a hole", {.opcode = APERTURE_OP_DMA, .src = table.phys[0], .dst = 0xdead00000000ULL,
                           .length = 4096}, APERTURE_ST_EFAULT},
        {"dma to 2^64-4096", {.opcode = APERTURE_OP_DMA, .src = table.phys[0], .dst = ~0ULL - 4095, .length = 4096},
         APERTURE_ST_EFAULT},
        {"dma into the control BAR", {.opcode = APERTURE_OP_DMA, .src = table.phys[0], .dst = d->ctl_phys,
                                      .length = 64}, APERTURE_ST_EFAULT},
        {"dma into an unmapped window slot", {.opcode = APERTURE_OP_DMA, .src = table.phys[0],
                                              .dst = d->win_phys + (d->nr_slots - 1) * d->slot, .length = 4096},
         APERTURE_ST_EFAULT},
        {"dma crossing the NVDIMM end", {.opcode = APERTURE_OP_DMA, .src = dax_end - 4096, .dst = 0, .length = 8192,
                                         .flags = APERTURE_DMA_DST_LOCAL}, APERTURE_ST_ECROSS},
        {"dma local beyond device memory", {.opcode = APERTURE_OP_DMA, .src = d->devmem, .dst = table.phys[0],
                                            .length = 4096, .flags = APERTURE_DMA_SRC_LOCAL}, APERTURE_ST_ERANGE},
        {"dma local wrapping", {.opcode = APERTURE_OP_DMA, .src = ~0ULL - 100, .dst = table.phys[0], .length = 4096,
                                .flags = APERTURE_DMA_SRC_LOCAL}, APERTURE_ST_ERANGE},
        {"list too long", {.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                           .length = APERTURE_MAX_LIST_ENTRIES + 1}, APERTURE_ST_ETOOBIG},
        {"list empty", {.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0], .length = 0}, APERTURE_ST_EINVAL},
        {"list table in a hole", {.opcode = APERTURE_OP_DMA_LIST, .src = 0xdead00000000ULL, .length = 4},
         APERTURE_ST_EFAULT},
    };
    int n = (int)(sizeof(cases) / sizeof(cases[0]));
    jb_printf(&jb, "{\"device\":%d,\"cases\":[", d->index);
    for (int i = 0; i < n; i++) {
        int st = cmd(d, cases[i].desc, NULL);
        int match = st == cases[i].expect;
        ok &= match;
        jb_printf(&jb, "%s{\"case\":\"%s\",\"status\":\"%s\",\"expected\":\"%s\"}", i ? "," : "", cases[i].name,
                  st < 0 ? "timeout" : aperture_status_name((unsigned)st), aperture_status_name((unsigned)cases[i].expect));
    }
    /* All-or-nothing lists: entry 0 is valid, entry 1 is not; entry 0's destination must stay untouched. */
    {
        struct rambuf src = {0}, dst = {0};
        ram_alloc(&src, 1);
        ram_alloc(&dst, 1);
        struct aperture_list_entry *ents = (struct aperture_list_entry *)table.buf;
        pattern_fill(src.buf, 4096, 205);
        memset(dst.buf, 0xEE, 4096);
        ents[0] = (struct aperture_list_entry){.src = src.phys[0], .dst = dst.phys[0], .length = 4096};
        ents[1] = (struct aperture_list_entry){.src = src.phys[0], .dst = 0xdead00000000ULL, .length = 4096};
        uint64_t result = 99;
        int st = cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0], .length = 2},
                     &result);
        int untouched = dst.buf[0] == 0xEE && dst.buf[4095] == 0xEE;
        int match = st == APERTURE_ST_EFAULT && result == 1 && untouched;
        ok &= match;
        jb_printf(&jb, ",{\"case\":\"list with a bad second entry\",\"status\":\"%s\",\"expected\":\"EFAULT\","
                  "\"failing_index\":%llu,\"first_entry_untouched\":%s}",
                  st < 0 ? "timeout" : aperture_status_name((unsigned)st), (unsigned long long)result,
                  untouched ? "true" : "false");
    }
    /* Random garbage descriptors: every one completes with some status; none hangs the device. */
    {
        struct aperture_desc junk[64];
        struct aperture_compl out[64];
        int completed = 0, timeouts = 0;
        int fd = open("/dev/urandom", O_RDONLY);
        for (int round = 0; round < 4 && fd >= 0; round++) {
            if (read(fd, junk, sizeof(junk)) != (ssize_t)sizeof(junk))
                break;
            for (int i = 0; i < 64; i++) /* never let garbage touch guest RAM by chance: keep DMA out */
                if (junk[i].opcode == APERTURE_OP_DMA || junk[i].opcode == APERTURE_OP_DMA_LIST)
                    junk[i].opcode = 77;
            if (submit(d, junk, 64, out) == 0)
                completed += 64;
            else
                timeouts++;
        }
        if (fd >= 0)
            close(fd);
        ok &= completed == 256 && !timeouts;
        jb_printf(&jb, ",{\"case\":\"256 random descriptors\",\"completed\":%d,\"timeouts\":%d}", completed, timeouts);
    }
    /* Garbage ring index: the host flags it, resynchronises, and keeps serving. */
    {
        uint32_t errors_before = r32(d, APERTURE_REG_ERRORS), garbage = d->sq_head + 100000;
        w32(d, APERTURE_REG_SQ_HEAD, garbage);
        d->regs[3] = 0;
        double deadline = now_s() + 5;
        while ((r32(d, APERTURE_REG_ERRORS) == errors_before || r32(d, APERTURE_REG_SQ_TAIL) != garbage) &&
               now_s() < deadline)
            usleep(100);
        int flagged = r32(d, APERTURE_REG_ERRORS) > errors_before &&
                      (r32(d, APERTURE_REG_STATUS) & APERTURE_STATUS_RING_ERROR);
        d->sq_head = r32(d, APERTURE_REG_SQ_TAIL);
        int alive = cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_NOP}, NULL) == APERTURE_ST_OK;
        ok &= flagged && alive;
        jb_printf(&jb, ",{\"case\":\"garbage SQ_HEAD\",\"flagged\":%s,\"alive_after\":%s}", flagged ? "true" : "false",
                  alive ? "true" : "false");
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_APERTURE_BAD_DESCRIPTORS, ok, jb.buf);
}

/* ---------------------------------------------------------------- API for other scenarios (remap.c) */
int aperture_discover(void) { return discover(); }
uint32_t aperture_nr_slots(int i) { return devs[i].nr_slots; }
uint64_t aperture_slot_size(int i) { return devs[i].slot; }
uint8_t *aperture_window(int i) { return devs[i].win; }
uint32_t aperture_generation(int i) { return r32(&devs[i], APERTURE_REG_GENERATION); }

/* A consistent copy of the slot table (seqlock); returns the (even) generation it belongs to. */
uint32_t aperture_snapshot(int i, uint64_t *table, uint64_t *retries)
{
    struct apdev *d = &devs[i];
    for (;;) {
        uint32_t g1 = r32(d, APERTURE_REG_GENERATION);
        __sync_synchronize();
        for (uint32_t s = 0; s < d->nr_slots; s++)
            table[s] = r64(d, APERTURE_REG_SLOT_TABLE + 8 * s);
        __sync_synchronize();
        if (!(g1 & 1) && g1 == r32(d, APERTURE_REG_GENERATION))
            return g1;
        (*retries)++;
    }
}

int aperture_remap_window(int i, double wait_s) { return map_window(&devs[i], wait_s); }

int aperture_dma(int i, uint64_t src, uint64_t dst, uint64_t len, uint16_t flags)
{
    return dma(&devs[i], src, dst, len, flags);
}

unsigned long long aperture_stale_completions(void) { return stale_completions; }

volatile uint8_t *aperture_ctl(int i) { return devs[i].ctl; }
unsigned long long aperture_window_phys(int i) { return devs[i].win_phys; }

void aperture_doorbell(int i)
{
    __sync_synchronize();
    devs[i].regs[3] = 0;
}

void aperture_resync(int i)
{
    /* Whatever the fuzzer left in the rings: start again from the device's current state. */
    devs[i].cq_tail = r32(&devs[i], APERTURE_REG_CQ_HEAD);
    w32(&devs[i], APERTURE_REG_CQ_TAIL, devs[i].cq_tail);
    devs[i].sq_head = r32(&devs[i], APERTURE_REG_SQ_TAIL);
    w32(&devs[i], APERTURE_REG_SQ_HEAD, devs[i].sq_head);
}

int aperture_nop(int i)
{
    return cmd(&devs[i], (struct aperture_desc){.opcode = APERTURE_OP_NOP}, NULL);
}

int aperture_ram_page(void **buf, unsigned long long *phys)
{
    static struct rambuf r;
    if (ram_alloc(&r, 1) != 0)
        return -1;
    *buf = r.buf;
    *phys = r.phys[0];
    return 0;
}

/* ---------------------------------------------------------------- bench */
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void bench_device(struct apdev *d, struct daxmap *dx)
{
    enum { N = 1000 };
    static double rtt[N];
    char line[768];
    /* MAP round trip: alternate two pages in slot 0 (each MAP writes back one slot and loads another). */
    map_page(d, 0, 0);
    for (int i = 0; i < N; i++) {
        double t0 = now_s();
        map_page(d, 0, (uint64_t)(1 + (i & 1)));
        rtt[i] = (now_s() - t0) * 1e6;
    }
    unmap_slot(d, 0);
    qsort(rtt, N, sizeof(rtt[0]), cmp_double);
    /* 2 MiB descriptors, device-local -> devdax, 32 per doorbell. */
    struct aperture_desc descs[32];
    struct aperture_compl out[32];
    double mbps_2m = 0, mbps_4k = 0, desc_4k = 0;
    if (dx->map && dx->size >= 96 * MIB) {
        for (int i = 0; i < 32; i++)
            descs[i] = (struct aperture_desc){.opcode = APERTURE_OP_DMA, .flags = APERTURE_DMA_SRC_LOCAL,
                                              .src = (uint64_t)(i % exposable_pages(d)) * d->slot,
                                              .dst = dx->phys + 16 * MIB + (uint64_t)i * 2 * MIB, .length = 2 * MIB};
        double t0 = 0, bytes = 0;
        for (int r = 0; r < 5; r++) { /* round 0 warms the host's mappings (first-touch faults) */
            if (r == 1)
                t0 = now_s();
            for (int i = 0; i < 32; i++)
                descs[i].tag = 0;
            if (submit(d, descs, 32, out) == 0 && r > 0)
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
        for (size_t i = 0; i < entries; i++)
            ents[i] = (struct aperture_list_entry){.src = data.phys[i], .dst = (scratch_page(d, 0) == UINT64_MAX ? 0 : scratch_page(d, 0)) * d->slot +
                                                         (i * 4096) % d->slot,
                                                   .length = 4096, .flags = APERTURE_DMA_DST_LOCAL};
        double t0 = 0, n = 0;
        for (int r = 0; r < 21; r++) { /* round 0: warm-up */
            if (r == 1)
                t0 = now_s();
            if (cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
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

void scenario_aperture(int bench_only)
{
    struct daxmap dx = {0};
    int expected = atoi(env_or(APERTURE_ENV_DEVICES, "0"));
    if (expected == 0)
        return;
    int n = discover();
    if (n < expected) {
        char msg[128];
        snprintf(msg, sizeof(msg), "{\"error\":\"found %d aperture devices, expected %d\"}", n, expected);
        report_check(APERTURE_CHECK_APERTURE_WINDOW, 0, msg);
        return;
    }
    open_devdax(&dx);
    if (bench_only) {
        if (!dx.map)
            report_log("bench-device: no devdax mapping; 2 MiB DMA figures skipped");
        bench_device(&devs[0], &dx);
        return;
    }
    if (getenv(APERTURE_ENV_EXPECT)) {
        /* Second boot of --reboot: what the first boot wrote through the window is still in device memory. */
        struct jbuf jb;
        int ok = 1;
        jb_init(&jb);
        jb_printf(&jb, "{\"devices\":[");
        for (int i = 0; i < n; i++) {
            struct apdev *d = &devs[i];
            uint32_t pages = window_pages(d), intact = 0;
            size_t len = chunk(d, 64 * KIB);
            for (uint32_t p = 0; p < pages; p++) {
                if (map_page(d, 0, p) == APERTURE_ST_OK && pattern_check(d->win, len, 100 + p))
                    intact++;
            }
            unmap_slot(d, 0);
            ok &= intact == pages && pages > 0;
            jb_printf(&jb, "%s{\"device\":%d,\"pages_checked\":%u,\"intact\":%u}", i ? "," : "", d->index, pages,
                      intact);
        }
        jb_printf(&jb, "]}");
        report_check(APERTURE_CHECK_APERTURE_PERSISTENCE, ok, jb.buf);
    }
    jb_init(&written);
    jb_printf(&written, "{\"type\":\"" APERTURE_MSG_WRITTEN "\",\"regions\":[");
    {
        struct jbuf jb;
        int ok = 1;
        jb_init(&jb);
        jb_printf(&jb, "{\"devices\":[");
        for (int i = 0; i < n; i++) {
            if (i)
                jb_printf(&jb, ",");
            ok &= check_window(&devs[i], &jb);
        }
        jb_printf(&jb, "]}");
        report_check(APERTURE_CHECK_APERTURE_WINDOW, ok, jb.buf);
    }
    check_hidden(&devs[0], &dx);
    check_pmem_device(&devs[0], &dx);
    check_ram_device(&devs[0]);
    check_device_device(&devs[0], n > 1 ? &devs[1] : NULL);
    check_bad(&devs[0], &dx);
    jb_printf(&written, "]}");
    report_line(written.buf);
}

/* ---------------------------------------------------------------- command-line tools (in a live guest) */
static unsigned long long num(const char *s) { return strtoull(s, NULL, 0); }

static struct apdev *tool_dev(const char *idx)
{
    int n = discover();
    int i = (int)num(idx);
    if (i < 0 || i >= n) {
        fprintf(stderr, "no aperture device %s (found %d)\n", idx, n);
        return NULL;
    }
    return &devs[i];
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
        struct aperture_desc desc = {.opcode = APERTURE_OP_DMA_LIST, .tag = next_tag++, .src = table.phys[0],
                                     .length = entries};
        memcpy((void *)(d->ctl + APERTURE_REG_SQ + ((d->sq_head + i) % APERTURE_RING_ENTRIES) * 64), &desc,
               sizeof(desc));
    }
    __sync_synchronize();
    d->sq_head += n;
    w32(d, APERTURE_REG_SQ_HEAD, d->sq_head);
    __sync_synchronize();
    d->regs[3] = 0;
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
        int n = discover();
        for (int i = 0; i < n; i++)
            printf("device %d: ctl %s window %s @ %#llx, %u slots of %#llx, %u pages\n", devs[i].index,
                   devs[i].ctl_bdf, devs[i].win_bdf, devs[i].win_phys, devs[i].nr_slots,
                   (unsigned long long)devs[i].slot, devs[i].nr_pages);
        return n > 0 ? 0 : 1;
    }
    if (!strcmp(t, "map") && argc == 5 && (d = tool_dev(argv[2]))) {
        st = map_page(d, (uint32_t)num(argv[3]), num(argv[4]));
    } else if (!strcmp(t, "unmap") && argc == 4 && (d = tool_dev(argv[2]))) {
        st = unmap_slot(d, (uint32_t)num(argv[3]));
    } else if (!strcmp(t, "dma") && (argc == 6 || argc == 7) && (d = tool_dev(argv[2]))) {
        st = dma(d, num(argv[3]), num(argv[4]), num(argv[5]), argc == 7 ? (uint16_t)num(argv[6]) : 0);
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
