/* Checks of the guest kernel driver (guest/driver/): device memory as device-private pages, the window as P2P
 * memory, and "map this page for a peer". The fixture binds the last aperture device to the driver (through
 * driver_override); the other devices stay with the helper. Each check opens /dev/apertureN itself, so what it
 * migrated and mapped goes away with its process.
 *   zone_device.window     O_DIRECT from the NVMe namespace into a mapping of a window page (P2P), beside the
 *                          raw BAR mapping of the same page (EFAULT)
 *   hmm.migrate            64 MiB of a process's memory into device memory (device DMA); the host finds it
 *   hmm.fault_back         the CPU touches migrated memory: back by device DMA, intact, counted
 *   p2p.peer_map           NVMe -> device-private page through the window and back; the other device's DMA
 *                          engine as a second peer; peer-map latency
 *   p2p.peer_map_hidden    a page of a hidden range: migrated, but never mapped for a peer (EACCES)
 *   p2p.pinned_vs_remap    NVMe DMA into pinned pages while the host remaps every 5 ms
 *   driver.unload          rmmod refused while a page is pinned, done when nothing is
 * Device bytes the host should find after the run go in the detail's "device_bytes". */
#define _GNU_SOURCE
#include "checks.h"
#include "device.h"
#include "harness.h"
#include "report.h"

#include "aperture_uapi.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DRIVER_DIR "/sys/bus/pci/drivers/aperture"
#define DRIVER_MODULE "aperture_drv"
#define NVME_DEV "/dev/nvme0n1"
#define PAGE 4096UL
/* Namespace offsets of these checks (p2p.nvme_cmb uses 1-2 MiB). */
#define NS_WINDOW (8 * MIB)
#define NS_PEER (9 * MIB)
#define NS_BACK (10 * MIB)
#define NS_PINNED (11 * MIB)
#define MIGRATE_MAX (64 * MIB)
#define FAULT_MAX (8 * MIB)
#define PEER_PAGES 4
#define LATENCY_ROUNDS 200
#define PINNED_S 1.0

static struct {
    struct apdev *d;
    char dev[64];
    char why[512];
} kd;

/* Exposable device memory of the bound device: the checks size themselves to it (64 MiB migrated on the
 * default 256 MiB device, less on a small one). */
static uint64_t exposable(void) { return kd.d ? (uint64_t)apdev_exposable_pages(kd.d) * kd.d->slot : 0; }

static size_t scaled(size_t max, unsigned divisor)
{
    size_t n = (size_t)(exposable() / divisor) & ~(size_t)(MIB - 1);

    return n < max ? (n ? n : MIB) : max;
}

/* ---------------------------------------------------------------- fixture: the last device, bound */
static int bind_device(struct apdev *d)
{
    char path[512];

    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", d->ctl_bdf);
    if (write_text(path, "aperture") != 0)
        return -1;
    /* A driver loaded after the override binds the device itself. */
    snprintf(path, sizeof(path), DRIVER_DIR "/%s", d->ctl_bdf);
    if (!path_exists(path) && write_text(DRIVER_DIR "/bind", d->ctl_bdf) != 0)
        return -1;
    snprintf(kd.dev, sizeof(kd.dev), "/dev/aperture%d", d->index);
    for (int i = 0; i < 200 && !path_exists(kd.dev); i++)
        usleep(10000);
    return path_exists(kd.dev) ? 0 : -1;
}

/* Device memory the driver's checks may overwrite from here on (it allocates from the top down, at most
 * DRIVER_BUDGET): the host takes what the helper claimed there earlier as superseded, not as lost. */
#define DRIVER_BUDGET (160 * MIB)

static uint64_t exposable(void);

static void release_to_driver(void)
{
    uint64_t top = exposable(), lo = top > DRIVER_BUDGET ? top - DRIVER_BUDGET : 0;
    char line[256];

    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_WRITTEN "\",\"regions\":[{\"device\":%d,\"offset\":%llu,"
             "\"len\":%llu,\"released\":true}]}", kd.d->index, (unsigned long long)lo,
             (unsigned long long)(kd.d->devmem - lo));
    report_line(line);
}

static int kdev_setup(void)
{
    int n = apdev_count();

    kd.d = NULL;
    if (n == 0) {
        snprintf(kd.why, sizeof(kd.why), "no aperture devices in this VM");
        return 0;
    }
    if (!path_exists(DRIVER_DIR)) {
        snprintf(kd.why, sizeof(kd.why), "the aperture driver is not loaded (it is built for the kernel "
                 "`aperture kernel build` makes)");
        return 0;
    }
    if (bind_device(apdev_get(n - 1)) != 0) {
        snprintf(kd.why, sizeof(kd.why), "binding device %d (%s) to the driver failed: %s", apdev_get(n - 1)->index,
                 apdev_get(n - 1)->ctl_bdf, strerror(errno));
        return 0;
    }
    kd.d = apdev_get(n - 1);
    kd.d->driver_owned = 1;
    release_to_driver();
    return 0;
}

static void kdev_teardown(void)
{
    char path[512];

    if (!kd.d)
        return;
    if (path_exists(DRIVER_DIR))
        write_text(DRIVER_DIR "/unbind", kd.d->ctl_bdf);
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", kd.d->ctl_bdf);
    write_text(path, "\n");
    kd.d->driver_owned = 0;
    apdev_resync(kd.d);
    kd.d = NULL;
}

const struct fixture fixture_kdev = {
    .name = "kdev", .needs = &fixture_devices, .setup = kdev_setup, .teardown = kdev_teardown,
};

/* ---------------------------------------------------------------- helpers */
static int absent(const char *check)
{
    struct jbuf jb;

    if (kd.d)
        return 0;
    jb_init(&jb);
    jb_printf(&jb, "{\"result\":\"absent\",\"why\":");
    jb_str(&jb, kd.why);
    jb_printf(&jb, "}");
    report_check(check, 0, jb.buf);
    return 1;
}

/* A check whose own setup (open, memory, a first migration) failed: fail it with the errno. */
static void setup_failed(const char *check)
{
    char detail[96];

    snprintf(detail, sizeof(detail), "{\"error\":\"setup: %s\"}", errno_name(errno));
    report_check(check, 0, detail);
}

static uint32_t seed_for(unsigned k)
{
    const char *token = env_or(APERTURE_ENV_STAMP, "1");

    return ((uint32_t)(strtoul(token, NULL, 16) & 0xfff) << 4 | (k & 0xf)) | 1;
}

static uint8_t *anon(size_t len)
{
    uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    return m == MAP_FAILED ? NULL : m;
}

static int migrate(int fd, void *addr, size_t len, unsigned flags, uint64_t *offsets, uint64_t *migrated)
{
    struct aperture_migrate m = {.addr = (uintptr_t)addr, .npages = len / PAGE, .flags = flags,
                                 .offsets = (uintptr_t)offsets};
    int rc = ioctl(fd, APERTURE_IOC_MIGRATE, &m);

    *migrated = m.migrated;
    return rc;
}

static int stats(int fd, struct aperture_stats *s) { return ioctl(fd, APERTURE_IOC_STATS, s); }

/* Whether buf holds pattern bytes [start, start + len) of seed: a page at byte start of a buffer filled with it. */
static int pattern_at_ok(const uint8_t *buf, size_t len, uint32_t seed, uint64_t start)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != aperture_pattern_byte(seed, start + i))
            return 0;
    return 1;
}

static void device_bytes(struct jbuf *jb, uint64_t offset, uint64_t len, uint32_t seed, uint64_t start, int first)
{
    jb_printf(jb, "%s{\"device\":%d,\"offset\":%llu,\"len\":%llu,\"seed\":%u,\"start\":%llu}", first ? "" : ",",
              kd.d->index, (unsigned long long)offset, (unsigned long long)len, seed, (unsigned long long)start);
}

/* The namespace, O_DIRECT; fills [off, off + len) with the pattern of seed from an ordinary buffer. */
static int nvme_prepare(uint64_t off, size_t len, uint32_t seed)
{
    int fd = open(NVME_DEV, O_RDWR | O_DIRECT | O_CLOEXEC);
    uint8_t *buf = anon(len);

    if (fd < 0 || !buf) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    pattern_fill(buf, len, seed);
    if (pwrite(fd, buf, len, (off_t)off) != (ssize_t)len || fsync(fd) != 0) {
        close(fd);
        fd = -1;
    }
    munmap(buf, len);
    return fd;
}

static const char *io_result(ssize_t n, size_t want)
{
    return n == (ssize_t)want ? "ok" : n < 0 ? errno_name(errno) : "short";
}

struct peer {
    struct aperture_peer_map pm;
    uint8_t *map;
};

static int peer_map(int fd, void *addr, struct peer *p)
{
    memset(p, 0, sizeof(*p));
    p->pm.addr = (uintptr_t)addr;
    if (ioctl(fd, APERTURE_IOC_PEER_MAP, &p->pm) != 0)
        return -1;
    p->map = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(p->pm.id * PAGE));
    if (p->map == MAP_FAILED) {
        p->map = NULL;
        return -1;
    }
    return 0;
}

static void peer_unmap(int fd, struct peer *p)
{
    if (p->map)
        munmap(p->map, PAGE);
    if (p->pm.id)
        ioctl(fd, APERTURE_IOC_PEER_UNMAP, &p->pm.id);
    memset(p, 0, sizeof(*p));
}

/* ---------------------------------------------------------------- zone_device.window */
static void check_window_row(void)
{
    struct jbuf jb;
    uint32_t seed = seed_for(1);
    const char *row = "not attempted", *bar_row = "not attempted";
    int fd, ns, data_ok = 0;
    uint64_t migrated = 0;
    struct peer p = {0};
    uint8_t *buf;

    if (absent(APERTURE_CHECK_ZONE_DEVICE_WINDOW))
        return;
    jb_init(&jb);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon(PAGE);
    ns = nvme_prepare(NS_WINDOW, PAGE, seed);
    if (fd < 0 || !buf || ns < 0) {
        jb_printf(&jb, "{\"row\":\"window\",\"result\":\"%s\",\"why\":\"setup: %s\"}", errno_name(errno),
                  fd < 0 ? "open " : ns < 0 ? "no NVMe namespace " NVME_DEV : "memory");
        report_check(APERTURE_CHECK_ZONE_DEVICE_WINDOW, 0, jb.buf);
        return;
    }
    memset(buf, 0x5a, PAGE);
    if (migrate(fd, buf, PAGE, 0, NULL, &migrated) == 0 && migrated == 1 && peer_map(fd, buf, &p) == 0) {
        row = io_result(pread(ns, p.map, PAGE, NS_WINDOW), PAGE);
        data_ok = pattern_check(p.map, PAGE, seed);
        /* The raw BAR row: the same window page through the sysfs resource mapping (a PFN map, no pages). */
        if (kd.d->win) {
            void *raw = kd.d->win + (p.pm.bus_addr - kd.d->win_phys);
            bar_row = io_result(pread(ns, raw, PAGE, NS_WINDOW), PAGE);
        }
    } else {
        row = errno_name(errno);
    }
    jb_printf(&jb, "{\"row\":\"window\",\"result\":\"%s\",\"data_ok\":%s,\"bus_addr\":%llu,\"slot\":%u,"
              "\"device\":%d,\"bar_row\":\"%s\",\"source\":\"" NVME_DEV "\",\"device_bytes\":[",
              row, data_ok ? "true" : "false", (unsigned long long)p.pm.bus_addr, p.pm.slot, kd.d->index, bar_row);
    if (data_ok)
        device_bytes(&jb, p.pm.dev_offset, PAGE, seed, 0, 1);
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_ZONE_DEVICE_WINDOW, !strcmp(row, "ok") && data_ok && !strcmp(bar_row, "EFAULT"),
                 jb.buf);
    peer_unmap(fd, &p);
    close(ns);
    close(fd);
}

/* ---------------------------------------------------------------- hmm.migrate */
static void check_migrate(void)
{
    struct aperture_stats s0, s1;
    struct jbuf jb;
    uint32_t seed = seed_for(2);
    uint64_t migrated = 0, *offsets;
    const size_t MIGRATE_LEN = scaled(MIGRATE_MAX, 3);
    size_t npages = MIGRATE_LEN / PAGE, runs = 0, i, start;
    double t0, secs;
    uint8_t *buf;
    int fd, rc;

    if (absent(APERTURE_CHECK_HMM_MIGRATE))
        return;
    jb_init(&jb);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon(MIGRATE_LEN);
    offsets = calloc(npages, sizeof(*offsets));
    if (fd < 0 || !buf || !offsets) {
        setup_failed(APERTURE_CHECK_HMM_MIGRATE);
        return;
    }
    pattern_fill(buf, MIGRATE_LEN, seed);
    stats(fd, &s0);
    t0 = now_s();
    rc = migrate(fd, buf, MIGRATE_LEN, 0, offsets, &migrated);
    secs = now_s() - t0;
    stats(fd, &s1);
    jb_printf(&jb, "{\"bytes\":%zu,\"pages\":%zu,\"migrated\":%llu,\"ioctl\":\"%s\",\"seconds\":%.4f,"
              "\"mb_s\":%.1f,\"pages_to_device\":%llu,\"bytes_to_device\":%llu,\"device_bytes\":[",
              MIGRATE_LEN, npages, (unsigned long long)migrated, rc ? errno_name(errno) : "ok", secs,
              MIGRATE_LEN / 1e6 / (secs > 0 ? secs : 1e-9),
              (unsigned long long)(s1.pages_to_device - s0.pages_to_device),
              (unsigned long long)(s1.bytes_to_device - s0.bytes_to_device));
    /* Runs of pages contiguous in device memory: the host reads each and compares it with the pattern. */
    for (start = 0, i = 1; rc == 0 && i <= npages; i++) {
        if (i < npages && offsets[i] == offsets[i - 1] + PAGE && offsets[i] != ~0ULL)
            continue;
        if (offsets[start] != ~0ULL && runs < 40)
            device_bytes(&jb, offsets[start], (i - start) * PAGE, seed, start * PAGE, runs == 0);
        runs++;
        start = i;
    }
    jb_printf(&jb, "],\"runs\":%zu}", runs);
    EXPECT_EQ(rc, 0);
    EXPECT_EQ(migrated, npages);
    EXPECT_LE(runs, 40);
    EXPECT_EQ(s1.pages_to_device - s0.pages_to_device, npages);
    report_check(APERTURE_CHECK_HMM_MIGRATE, 1, jb.buf);
    close(fd);
}

/* ---------------------------------------------------------------- hmm.fault_back */
static void check_fault_back(void)
{
    struct aperture_stats s0, s1;
    struct jbuf jb;
    uint32_t seed = seed_for(3);
    uint64_t migrated = 0;
    const size_t FAULT_LEN = scaled(FAULT_MAX, 8);
    size_t npages = FAULT_LEN / PAGE;
    double t0, secs = 0;
    int fd, intact = 0, writable = 0;
    uint8_t *buf;

    if (absent(APERTURE_CHECK_HMM_FAULT_BACK))
        return;
    jb_init(&jb);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon(FAULT_LEN);
    if (fd < 0 || !buf) {
        setup_failed(APERTURE_CHECK_HMM_FAULT_BACK);
        return;
    }
    pattern_fill(buf, FAULT_LEN, seed);
    if (migrate(fd, buf, FAULT_LEN, 0, NULL, &migrated) == 0 && migrated == npages) {
        stats(fd, &s0);
        t0 = now_s();
        intact = pattern_check(buf, FAULT_LEN, seed); /* every page faults back by device DMA */
        secs = now_s() - t0;
        stats(fd, &s1);
        uint8_t flipped = (uint8_t)(aperture_pattern_byte(seed, FAULT_LEN - 1) ^ 0xffu);
        buf[FAULT_LEN - 1] = flipped;
        writable = buf[FAULT_LEN - 1] == flipped;
    } else {
        memset(&s0, 0, sizeof(s0));
        s1 = s0;
    }
    jb_printf(&jb, "{\"bytes\":%zu,\"migrated\":%llu,\"intact\":%s,\"writable_after\":%s,\"seconds\":%.4f,"
              "\"mb_s\":%.1f,\"faults\":%llu,\"pages_to_ram\":%llu,\"bytes_to_ram\":%llu}",
              FAULT_LEN, (unsigned long long)migrated, intact ? "true" : "false", writable ? "true" : "false", secs,
              FAULT_LEN / 1e6 / (secs > 0 ? secs : 1e-9), (unsigned long long)(s1.faults - s0.faults),
              (unsigned long long)(s1.pages_to_ram - s0.pages_to_ram),
              (unsigned long long)(s1.bytes_to_ram - s0.bytes_to_ram));
    EXPECT_TRUE(intact);
    EXPECT_TRUE(writable);
    EXPECT_GE(s1.faults - s0.faults, npages);
    EXPECT_EQ(s1.pages_to_ram - s0.pages_to_ram, npages);
    EXPECT_EQ(s1.bytes_to_ram - s0.bytes_to_ram, FAULT_LEN);
    report_check(APERTURE_CHECK_HMM_FAULT_BACK, 1, jb.buf);
    close(fd);
}

/* ---------------------------------------------------------------- p2p.peer_map */
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* PEER_MAP + PEER_UNMAP over pages in 16 different device pages (2 slots' worth more than the window has), so
 * maps evict; p50/p99 of the map in microseconds. */
static void peer_map_latency(int fd, struct jbuf *jb)
{
    const size_t stride = kd.d->slot;
    size_t n = exposable() / stride / 4;
    n = n > 16 ? 16 : n < 2 ? 2 : n;
    const size_t len = stride * n;
    static double map_us[LATENCY_ROUNDS], unmap_us[LATENCY_ROUNDS];
    struct aperture_stats s0, s1;
    uint64_t migrated = 0;
    uint8_t *buf = anon(len);
    int done = 0;

    if (!buf || migrate(fd, buf, len, 0, NULL, &migrated) != 0 || migrated != len / PAGE) {
        jb_printf(jb, ",\"latency\":{\"error\":\"%s\"}", errno_name(errno));
        return;
    }
    stats(fd, &s0);
    for (int i = 0; i < LATENCY_ROUNDS; i++) {
        struct aperture_peer_map pm = {.addr = (uintptr_t)(buf + (i % n) * stride)};
        double t0 = now_s(), t1;

        if (ioctl(fd, APERTURE_IOC_PEER_MAP, &pm) != 0)
            break;
        t1 = now_s();
        ioctl(fd, APERTURE_IOC_PEER_UNMAP, &pm.id);
        map_us[done] = (t1 - t0) * 1e6;
        unmap_us[done++] = (now_s() - t1) * 1e6;
    }
    stats(fd, &s1);
    qsort(map_us, done, sizeof(double), cmp_double);
    qsort(unmap_us, done, sizeof(double), cmp_double);
    jb_printf(jb, ",\"latency\":{\"rounds\":%d,\"map_us_p50\":%.1f,\"map_us_p99\":%.1f,\"unmap_us_p50\":%.1f,"
              "\"unmap_us_p99\":%.1f,\"evictions\":%llu}", done, done ? map_us[done / 2] : 0,
              done ? map_us[done * 99 / 100] : 0, done ? unmap_us[done / 2] : 0,
              done ? unmap_us[done * 99 / 100] : 0, (unsigned long long)(s1.evictions - s0.evictions));
    munmap(buf, len);
}

static void check_peer_map(void)
{
    struct peer p[PEER_PAGES + 1];
    struct jbuf jb, bytes;
    uint32_t seed = seed_for(4), seed_dev = seed_for(5);
    const char *in = "not attempted", *out = "not attempted", *dev_dma = "not attempted";
    int fd, ns, in_ok = 1, back_ok = 0, cpu_ok = 0, dev_ok = 0, mapped = 0;
    uint64_t migrated = 0;
    uint8_t *buf, *check;
    struct rambuf ram;
    struct apdev *peer_dev = apdev_count() > 1 ? apdev_get(0) : NULL;

    if (absent(APERTURE_CHECK_P2P_PEER_MAP))
        return;
    memset(p, 0, sizeof(p));
    jb_init(&jb);
    jb_init(&bytes);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon((PEER_PAGES + 1) * PAGE);
    check = anon(PEER_PAGES * PAGE);
    ns = nvme_prepare(NS_PEER, PEER_PAGES * PAGE, seed);
    if (fd < 0 || !buf || !check || ns < 0) {
        jb_printf(&jb, "{\"error\":\"setup: %s\"}", errno_name(errno));
        report_check(APERTURE_CHECK_P2P_PEER_MAP, 0, jb.buf);
        return;
    }
    memset(buf, 0, (PEER_PAGES + 1) * PAGE);
    if (migrate(fd, buf, (PEER_PAGES + 1) * PAGE, 0, NULL, &migrated) == 0 && migrated == PEER_PAGES + 1)
        for (mapped = 0; mapped <= PEER_PAGES && peer_map(fd, buf + mapped * PAGE, &p[mapped]) == 0; mapped++)
            ;
    if (mapped == PEER_PAGES + 1) {
        /* Peer 1, the NVMe controller: namespace -> each page's window mapping (the controller DMAs into the
         * slot), then window -> namespace elsewhere, read back through RAM. */
        for (int i = 0; i < PEER_PAGES; i++) {
            in = io_result(pread(ns, p[i].map, PAGE, NS_PEER + i * PAGE), PAGE);
            if (strcmp(in, "ok"))
                in_ok = 0;
        }
        for (int i = 0; in_ok && i < PEER_PAGES; i++)
            out = io_result(pwrite(ns, p[i].map, PAGE, NS_BACK + i * PAGE), PAGE);
        if (in_ok && !strcmp(out, "ok") && fsync(ns) == 0 &&
            pread(ns, check, PEER_PAGES * PAGE, NS_BACK) == (ssize_t)(PEER_PAGES * PAGE))
            back_ok = pattern_check(check, PEER_PAGES * PAGE, seed);
        /* Peer 2, the other aperture device's DMA engine (driven by the helper): RAM -> the bus address. */
        if (peer_dev && ram_alloc(&ram, 1) == 0) {
            pattern_fill(ram.buf, PAGE, seed_dev);
            int st = apdev_dma(peer_dev, ram.phys[0], p[PEER_PAGES].pm.bus_addr, PAGE, 0);
            dev_dma = st == 0 ? "ok" : aperture_status_name(st);
            dev_ok = st == 0 && pattern_check(p[PEER_PAGES].map, PAGE, seed_dev);
        } else if (!peer_dev) {
            dev_dma = "no second aperture device";
            dev_ok = 1;
        }
        for (int i = 0; i < PEER_PAGES + (peer_dev && dev_ok); i++) /* the last: only if a device wrote it */
            device_bytes(&bytes, p[i].pm.dev_offset, PAGE, i < PEER_PAGES ? seed : seed_dev,
                         i < PEER_PAGES ? i * PAGE : 0, i == 0);
    }
    jb_printf(&jb, "{\"pages\":%d,\"mapped\":%d,\"nvme_to_window\":\"%s\",\"window_to_nvme\":\"%s\","
              "\"nvme_round_trip_ok\":%s,\"device_dma\":\"%s\",\"device_dma_ok\":%s,\"slots\":[",
              PEER_PAGES + 1, mapped, in, out, back_ok ? "true" : "false", dev_dma, dev_ok ? "true" : "false");
    for (int i = 0; i < mapped; i++)
        jb_printf(&jb, "%s{\"slot\":%u,\"bus_addr\":%llu,\"dev_offset\":%llu}", i ? "," : "", p[i].pm.slot,
                  (unsigned long long)p[i].pm.bus_addr, (unsigned long long)p[i].pm.dev_offset);
    jb_printf(&jb, "],\"device\":%d,\"device_bytes\":[%s]", kd.d->index, bytes.buf);
    /* The CPU reads the pages the NVMe wrote: they fault back from device memory by device DMA. */
    for (int i = 0; i <= PEER_PAGES; i++)
        peer_unmap(fd, &p[i]);
    if (back_ok) {
        cpu_ok = 1;
        for (int i = 0; i < PEER_PAGES; i++)
            cpu_ok &= pattern_at_ok(buf + i * PAGE, PAGE, seed, i * PAGE);
    }
    jb_printf(&jb, ",\"cpu_fault_back_ok\":%s", cpu_ok ? "true" : "false");
    peer_map_latency(fd, &jb);
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_P2P_PEER_MAP, back_ok && cpu_ok && dev_ok, jb.buf);
    close(ns);
    close(fd);
}

/* ---------------------------------------------------------------- p2p.peer_map_hidden */
static void check_peer_map_hidden(void)
{
    struct aperture_peer_map pm = {0};
    struct jbuf jb;
    uint32_t seed = seed_for(6);
    uint64_t migrated = 0, offset = ~0ULL;
    int fd, rc = -1, err = 0, intact = 0;
    uint8_t *buf;

    if (absent(APERTURE_CHECK_P2P_PEER_MAP_HIDDEN))
        return;
    jb_init(&jb);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon(PAGE);
    if (fd < 0 || !buf) {
        jb_printf(&jb, "{\"error\":\"setup: %s\"}", errno_name(errno));
        report_check(APERTURE_CHECK_P2P_PEER_MAP_HIDDEN, 0, jb.buf);
        return;
    }
    pattern_fill(buf, PAGE, seed);
    if (migrate(fd, buf, PAGE, APERTURE_MIGRATE_HIDDEN, &offset, &migrated) == 0 && migrated == 1) {
        pm.addr = (uintptr_t)buf;
        rc = ioctl(fd, APERTURE_IOC_PEER_MAP, &pm);
        err = rc ? errno : 0;
        intact = pattern_check(buf, PAGE, seed); /* the device's own DMA reaches it: back intact */
    }
    jb_printf(&jb, "{\"migrated\":%llu,\"dev_offset\":%llu,\"hidden_start\":%llu,\"hidden_end\":%llu,"
              "\"peer_map\":\"%s\",\"fault_back_intact\":%s}", (unsigned long long)migrated,
              (unsigned long long)offset, (unsigned long long)kd.d->hidden_start,
              (unsigned long long)kd.d->hidden_end, rc == 0 ? "ok" : errno_name(err), intact ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_PEER_MAP_HIDDEN, migrated == 1 && rc != 0 && err == EACCES && intact &&
                 offset >= kd.d->hidden_start && offset < kd.d->hidden_end, jb.buf);
    close(fd);
}

/* ---------------------------------------------------------------- p2p.pinned_vs_remap */
static void check_pinned_vs_remap(void)
{
    struct peer p[PEER_PAGES];
    struct jbuf jb;
    uint64_t migrated = 0;
    uint32_t seed = 0;
    unsigned rounds = 0, bad_pages = 0, io_errors = 0;
    int fd, ns, mapped = 0;
    uint8_t *buf, *src;
    double end;

    if (absent(APERTURE_CHECK_P2P_PINNED_VS_REMAP))
        return;
    memset(p, 0, sizeof(p));
    jb_init(&jb);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    ns = open(NVME_DEV, O_RDWR | O_DIRECT | O_CLOEXEC);
    buf = anon(PEER_PAGES * PAGE);
    src = anon(PEER_PAGES * PAGE);
    if (fd < 0 || ns < 0 || !buf || !src) {
        jb_printf(&jb, "{\"error\":\"setup: %s\"}", errno_name(errno));
        report_check(APERTURE_CHECK_P2P_PINNED_VS_REMAP, 0, jb.buf);
        return;
    }
    memset(buf, 0, PEER_PAGES * PAGE);
    if (migrate(fd, buf, PEER_PAGES * PAGE, 0, NULL, &migrated) == 0 && migrated == PEER_PAGES)
        for (mapped = 0; mapped < PEER_PAGES && peer_map(fd, buf + mapped * PAGE, &p[mapped]) == 0; mapped++)
            ;
    report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_START "\",\"every_ms\":5}");
    end = now_s() + PINNED_S;
    while (mapped == PEER_PAGES && now_s() < end) {
        seed = seed_for(7) + 16 * rounds;
        pattern_fill(src, PEER_PAGES * PAGE, seed);
        if (pwrite(ns, src, PEER_PAGES * PAGE, NS_PINNED) != (ssize_t)(PEER_PAGES * PAGE)) {
            io_errors++;
            break;
        }
        for (int i = 0; i < PEER_PAGES; i++) {
            /* The controller DMAs into the pinned slot; the CPU then reads it through the same P2P page. */
            if (pread(ns, p[i].map, PAGE, NS_PINNED + i * PAGE) != (ssize_t)PAGE)
                io_errors++;
            else if (!pattern_at_ok(p[i].map, PAGE, seed, i * PAGE))
                bad_pages++;
        }
        rounds++;
    }
    report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_END "\"}");
    jb_printf(&jb, "{\"pages\":%d,\"mapped\":%d,\"rounds\":%u,\"bad_pages\":%u,\"io_errors\":%u,\"seconds\":%.1f,"
              "\"device\":%d,\"slots\":[", PEER_PAGES, mapped, rounds, bad_pages, io_errors, PINNED_S, kd.d->index);
    for (int i = 0; i < mapped; i++)
        jb_printf(&jb, "%s%u", i ? "," : "", p[i].pm.slot);
    jb_printf(&jb, "],\"device_bytes\":[");
    for (int i = 0; rounds && i < mapped; i++)
        device_bytes(&jb, p[i].pm.dev_offset, PAGE, seed, i * PAGE, i == 0);
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_P2P_PINNED_VS_REMAP, mapped == PEER_PAGES && rounds > 0 && !bad_pages && !io_errors,
                 jb.buf);
    for (int i = 0; i < mapped; i++)
        peer_unmap(fd, &p[i]);
    close(ns);
    close(fd);
}

/* ---------------------------------------------------------------- driver.unload */
static int delete_module(void)
{
    return (int)syscall(SYS_delete_module, DRIVER_MODULE, O_NONBLOCK);
}

/* Unbind through sysfs while a file is open and a page is migrated: the page comes back, the file's calls get
 * ENODEV, nothing breaks; then bind again. Returns the file's errno after the unbind (0: it still worked). */
static int unbind_with_file_open(int *page_ok)
{
    struct aperture_stats st;
    uint32_t seed = seed_for(8);
    uint64_t migrated = 0;
    int fd = open(kd.dev, O_RDWR | O_CLOEXEC), err = 0;
    uint8_t *buf = anon(PAGE);

    *page_ok = 0;
    if (fd < 0 || !buf)
        return -1;
    pattern_fill(buf, PAGE, seed);
    if (migrate(fd, buf, PAGE, 0, NULL, &migrated) != 0 || migrated != 1 ||
        write_text(DRIVER_DIR "/unbind", kd.d->ctl_bdf) != 0) {
        close(fd);
        return -1;
    }
    err = stats(fd, &st) == 0 ? 0 : errno;
    *page_ok = pattern_check(buf, PAGE, seed); /* migrated back at unbind: plain memory now */
    close(fd);
    return bind_device(kd.d) == 0 ? err : -1;
}

static void check_unload(void)
{
    struct peer p = {0};
    struct jbuf jb;
    uint64_t migrated = 0;
    int fd, pinned_rc = 0, pinned_err = 0, rc, err, reloaded, page_ok, open_err;
    uint8_t *buf;

    if (absent(APERTURE_CHECK_DRIVER_UNLOAD))
        return;
    jb_init(&jb);
    open_err = unbind_with_file_open(&page_ok);
    fd = open(kd.dev, O_RDWR | O_CLOEXEC);
    buf = anon(PAGE);
    if (fd < 0 || !buf || migrate(fd, buf, PAGE, 0, NULL, &migrated) != 0 || peer_map(fd, buf, &p) != 0) {
        setup_failed(APERTURE_CHECK_DRIVER_UNLOAD);
        return;
    }
    pinned_rc = delete_module();
    pinned_err = pinned_rc ? errno : 0;
    peer_unmap(fd, &p);
    close(fd);
    rc = delete_module();
    err = rc ? errno : 0;
    jb_printf(&jb, "{\"unbind_with_file_open\":{\"file_after\":\"%s\",\"page_back_intact\":%s},"
              "\"pinned\":{\"slot\":%u,\"rmmod\":\"%s\"},\"unpinned\":{\"rmmod\":\"%s\",\"driver_gone\":%s}",
              open_err < 0 ? "setup failed" : errno_name(open_err), page_ok ? "true" : "false", p.pm.slot,
              pinned_rc ? errno_name(pinned_err) : "ok", rc ? errno_name(err) : "ok",
              path_exists(DRIVER_DIR) ? "false" : "true");
    /* Load it again and rebind, so what runs after (the serve loop, teardown) finds the state it had. */
    reloaded = rc == 0 && run_cmd("insmod /lib/modules/" DRIVER_MODULE ".ko") == 0 && bind_device(kd.d) == 0;
    jb_printf(&jb, ",\"reloaded\":%s}", reloaded ? "true" : "false");
    report_check(APERTURE_CHECK_DRIVER_UNLOAD, open_err == ENODEV && page_ok && pinned_rc != 0 &&
                 (pinned_err == EAGAIN || pinned_err == EBUSY) && rc == 0 && reloaded, jb.buf);
}

/* ---------------------------------------------------------------- bench-driver */
static double median_of(double *v, int n)
{
    qsort(v, n, sizeof(double), cmp_double);
    return n ? v[n / 2] : 0;
}

/* Migration and fault-back throughput, peer-map latency (evicting and hitting a mapped slot). */
void bench_driver(void)
{
    enum { ROUNDS = 3, MAPS = 1000 };
    static double mig[ROUNDS], back[ROUNDS], map_us[MAPS], hit_us[MAPS], unmap_us[MAPS];
    const size_t stride = kd.d ? kd.d->slot : 0, quarter = stride ? exposable() / stride / 4 : 16;
    const size_t spread = quarter > 16 ? 16 : quarter < 2 ? 2 : quarter;
    const size_t MIGRATE_LEN = scaled(MIGRATE_MAX, 3), FAULT_LEN = scaled(FAULT_MAX, 8);
    uint64_t migrated = 0;
    char line[1024];
    int fd;

    if (!kd.d || (fd = open(kd.dev, O_RDWR | O_CLOEXEC)) < 0) {
        report_log("bench-driver: %s", kd.d ? strerror(errno) : kd.why);
        return;
    }
    for (int r = 0; r < ROUNDS; r++) {
        uint8_t *buf = anon(MIGRATE_LEN);
        double t0;

        if (!buf)
            break;
        pattern_fill(buf, MIGRATE_LEN, (uint32_t)r + 1);
        t0 = now_s();
        if (migrate(fd, buf, MIGRATE_LEN, 0, NULL, &migrated) != 0 || migrated != MIGRATE_LEN / PAGE)
            break;
        mig[r] = MIGRATE_LEN / 1e6 / (now_s() - t0);
        t0 = now_s();
        if (!pattern_check(buf, FAULT_LEN, (uint32_t)r + 1)) /* the first 16 MiB fault back */
            break;
        back[r] = FAULT_LEN / 1e6 / (now_s() - t0);
        munmap(buf, MIGRATE_LEN);
    }
    uint8_t *pages = anon(stride * spread);
    int done = 0;
    if (pages && migrate(fd, pages, stride * spread, 0, NULL, &migrated) == 0) {
        for (; done < MAPS; done++) {
            struct aperture_peer_map pm = {.addr = (uintptr_t)(pages + (done % spread) * stride)};
            struct aperture_peer_map again = {.addr = pm.addr + PAGE};
            double t0 = now_s(), t1, t2;

            if (ioctl(fd, APERTURE_IOC_PEER_MAP, &pm) != 0)
                break;
            t1 = now_s();
            if (ioctl(fd, APERTURE_IOC_PEER_MAP, &again) != 0) /* same device page: its slot is mapped */
                break;
            t2 = now_s();
            ioctl(fd, APERTURE_IOC_PEER_UNMAP, &again.id);
            ioctl(fd, APERTURE_IOC_PEER_UNMAP, &pm.id);
            map_us[done] = (t1 - t0) * 1e6;
            hit_us[done] = (t2 - t1) * 1e6;
            unmap_us[done] = (now_s() - t2) * 1e6 / 2;
        }
    }
    double map_p50 = median_of(map_us, done), map_p99 = done ? map_us[done * 99 / 100] : 0;
    snprintf(line, sizeof(line),
             "{\"type\":\"" APERTURE_MSG_FIGURES "\",\"values\":{\"migrate_64m_MBps\":%.1f,"
             "\"fault_back_MBps\":%.2f,\"peer_map_evict_us_p50\":%.1f,\"peer_map_evict_us_p99\":%.1f,"
             "\"peer_map_hit_us_p50\":%.1f,\"peer_unmap_us_p50\":%.1f,\"peer_map_rounds\":%d,"
             "\"slot_size\":%llu}}",
             median_of(mig, ROUNDS), median_of(back, ROUNDS), map_p50, map_p99, median_of(hit_us, done),
             median_of(unmap_us, done), done, (unsigned long long)stride);
    report_line(line);
    close(fd);
}

#define DRIVER_CHECK(id, check_name, function, limit, at)                                                     \
    TEST(id, .name = check_name, .fixture = &fixture_kdev, .fn = function, .timeout_s = limit,                 \
         .tags = TAG_DEFAULT | TAG_DRIVER, .order = at)

DRIVER_CHECK(check_driver_unload, APERTURE_CHECK_DRIVER_UNLOAD, check_unload, 60, 500);
DRIVER_CHECK(check_zone_device_window, APERTURE_CHECK_ZONE_DEVICE_WINDOW, check_window_row, 30, 510);
DRIVER_CHECK(check_hmm_migrate, APERTURE_CHECK_HMM_MIGRATE, check_migrate, 120, 520);
DRIVER_CHECK(check_hmm_fault_back, APERTURE_CHECK_HMM_FAULT_BACK, check_fault_back, 120, 530);
DRIVER_CHECK(check_p2p_peer_map, APERTURE_CHECK_P2P_PEER_MAP, check_peer_map, 120, 540);
DRIVER_CHECK(check_p2p_peer_map_hidden, APERTURE_CHECK_P2P_PEER_MAP_HIDDEN, check_peer_map_hidden, 30, 550);
DRIVER_CHECK(check_p2p_pinned_vs_remap, APERTURE_CHECK_P2P_PINNED_VS_REMAP, check_pinned_vs_remap, 60, 560);
