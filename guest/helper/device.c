/* The aperture device driver from userspace (see device.h). */
#define _GNU_SOURCE
#include "device.h"
#include "report.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static struct apdev devs[APERTURE_MAX_DEVICES];
static int ndevs;
static uint32_t next_tag = 1;

int apdev_count(void) { return ndevs; }
struct apdev *apdev_get(int i) { return &devs[i]; }
uint32_t apdev_next_tag(void) { return next_tag++; }

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
int apdev_map_window(struct apdev *d, double wait_s)
{
    char port[64], path[512], cls[32], child[256] = "";
    double deadline = now_s() + wait_s;
    snprintf(port, sizeof(port), "0000:00:%02x.0", apdev_r32(d, APERTURE_REG_WINDOW_PCI_SLOT));
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

int apdev_discover(void)
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
            (*(volatile uint32_t *)(ctl + APERTURE_REG_ABI_VERSION) >> 16) != APERTURE_ABI_MAJOR ||
            (*(volatile uint32_t *)(ctl + APERTURE_REG_ABI_VERSION) & 0xffff) < 3) { /* 1.3: DOORBELL_PEER */
            munmap((void *)ctl, APERTURE_CTL_SIZE);
            continue;
        }
        struct apdev *d = &devs[ndevs];
        memset(d, 0, sizeof(*d));
        d->ctl = ctl;
        d->ctl_phys = start;
        snprintf(d->ctl_bdf, sizeof(d->ctl_bdf), "%s", e->d_name);
        d->index = (int)apdev_r32(d, APERTURE_REG_DEVICE_INDEX);
        d->devmem = apdev_r64(d, APERTURE_REG_DEVMEM_SIZE);
        d->slot = apdev_r64(d, APERTURE_REG_SLOT_SIZE);
        d->nr_slots = apdev_r32(d, APERTURE_REG_NR_SLOTS);
        d->nr_pages = (uint32_t)(d->devmem / d->slot);
        d->doorbell = apdev_r32(d, APERTURE_REG_DOORBELL_PEER) << 16; /* vector 0 of the emulator's peer id */
        d->sq_head = apdev_r32(d, APERTURE_REG_SQ_HEAD);
        d->cq_tail = apdev_r32(d, APERTURE_REG_CQ_TAIL);
        if (apdev_r32(d, APERTURE_REG_NR_HIDDEN) > 0) {
            d->hidden_start = apdev_r64(d, APERTURE_REG_HIDDEN);
            d->hidden_end = apdev_r64(d, APERTURE_REG_HIDDEN + 8);
        }
        d->regs = map_bar(e->d_name, 0, 4096);
        apdev_map_window(d, 0.0);
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

int apdev_submit(struct apdev *d, struct aperture_desc *descs, int n, struct aperture_compl *out)
{
    for (int i = 0; i < n; i++) {
        if (!descs[i].tag)
            descs[i].tag = next_tag++;
        memcpy((void *)(d->ctl + APERTURE_REG_SQ + ((d->sq_head + (uint32_t)i) % APERTURE_RING_ENTRIES) * 64),
               &descs[i], sizeof(descs[i]));
    }
    __sync_synchronize();
    d->sq_head += (uint32_t)n;
    apdev_w32(d, APERTURE_REG_SQ_HEAD, d->sq_head);
    __sync_synchronize();
    d->regs[3] = d->doorbell; /* Doorbell: the emulator's peer id << 16, vector 0 */
    double deadline = now_s() + 5.0;
    for (int got = 0; got < n;) {
        if (apdev_r32(d, APERTURE_REG_CQ_HEAD) == d->cq_tail) {
            if (now_s() > deadline)
                return -1;
            __builtin_ia32_pause();
            continue;
        }
        __sync_synchronize();
        memcpy(&out[got], (const void *)(d->ctl + APERTURE_REG_CQ + (d->cq_tail % APERTURE_RING_ENTRIES) * 16),
               sizeof(out[got]));
        d->cq_tail++;
        apdev_w32(d, APERTURE_REG_CQ_TAIL, d->cq_tail);
        if (out[got].tag != descs[got].tag) {
            stale_completions++;
            continue;
        }
        got++;
    }
    return 0;
}

int apdev_cmd(struct apdev *d, struct aperture_desc desc, uint64_t *result)
{
    struct aperture_compl c;
    if (apdev_submit(d, &desc, 1, &c) != 0)
        return -1;
    if (result)
        *result = c.result;
    return c.status;
}

int apdev_map(struct apdev *d, uint32_t slot, uint64_t page)
{
    return apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_MAP, .slot = slot, .page = page}, NULL);
}

int apdev_unmap(struct apdev *d, uint32_t slot)
{
    return apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_UNMAP, .slot = slot}, NULL);
}

int apdev_dma(struct apdev *d, uint64_t src, uint64_t dst, uint64_t len, uint16_t flags)
{
    return apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA, .flags = flags, .src = src, .dst = dst,
                                         .length = len}, NULL);
}

/* Seqlock read of one slot-table entry; counts retries (odd or changed generation). */
uint64_t apdev_slot_entry(struct apdev *d, uint32_t slot, unsigned *retries)
{
    for (;;) {
        uint32_t g1 = apdev_r32(d, APERTURE_REG_GENERATION);
        __sync_synchronize();
        uint64_t v = apdev_r64(d, APERTURE_REG_SLOT_TABLE + 8 * slot);
        __sync_synchronize();
        if (!(g1 & 1) && g1 == apdev_r32(d, APERTURE_REG_GENERATION))
            return v;
        if (retries)
            (*retries)++;
    }
}

/* Write a pattern into a device page through the window (map into slot, write, leave mapped). */
int apdev_fill_page(struct apdev *d, uint32_t slot, uint64_t page, size_t len, uint32_t seed)
{
    if (apdev_map(d, slot, page) != APERTURE_ST_OK)
        return -1;
    pattern_fill(d->win + slot * d->slot, len, seed);
    return 0;
}

/* ---------------------------------------------------------------- guest memory for DMA */
int devdax_open(struct daxmap *dx)
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

int ram_alloc(struct rambuf *r, size_t pages)
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

/* ---------------------------------------------------------------- the rest of the driver */
uint32_t apdev_snapshot(struct apdev *d, uint64_t *table, uint64_t *retries)
{
    for (;;) {
        uint32_t g1 = apdev_r32(d, APERTURE_REG_GENERATION);
        __sync_synchronize();
        for (uint32_t s = 0; s < d->nr_slots; s++)
            table[s] = apdev_r64(d, APERTURE_REG_SLOT_TABLE + 8 * s);
        __sync_synchronize();
        if (!(g1 & 1) && g1 == apdev_r32(d, APERTURE_REG_GENERATION))
            return g1;
        (*retries)++;
    }
}

uint64_t apdev_exposable_pages(struct apdev *d)
{
    return d->hidden_end > d->hidden_start && d->hidden_start / d->slot < d->nr_pages ? d->hidden_start / d->slot
                                                                                      : d->nr_pages;
}

unsigned long long apdev_stale_completions(void) { return stale_completions; }

void apdev_doorbell(struct apdev *d)
{
    __sync_synchronize();
    d->regs[3] = d->doorbell; /* Doorbell: the emulator's peer id << 16, vector 0 */
}

void apdev_resync(struct apdev *d)
{
    d->cq_tail = apdev_r32(d, APERTURE_REG_CQ_HEAD);
    apdev_w32(d, APERTURE_REG_CQ_TAIL, d->cq_tail);
    d->sq_head = apdev_r32(d, APERTURE_REG_SQ_TAIL);
    apdev_w32(d, APERTURE_REG_SQ_HEAD, d->sq_head);
}

void apdev_resync_all(void)
{
    for (int i = 0; i < ndevs; i++)
        if (!devs[i].driver_owned)
            apdev_resync(&devs[i]);
}

int ram_page(void **buf, unsigned long long *phys)
{
    static struct rambuf r;
    if (ram_alloc(&r, 1) != 0)
        return -1;
    *buf = r.buf;
    *phys = r.phys[0];
    return 0;
}
