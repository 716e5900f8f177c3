/* Checks of the aperture devices: the window (map/remap/verify), non-exposable pages, P2P DMA (pmem <-> device,
 * RAM <-> device, device -> peer window), hostile descriptors, and persistence of device memory across a
 * reboot. Every write to device memory is reported ("written") so the host can verify device memory after
 * the run. */
#define _GNU_SOURCE
#include "checks.h"
#include "device.h"
#include "harness.h"
#include "report.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---------------------------------------------------------------- fixture: the devices and a devdax mapping */
static struct daxmap dx;

static int devices_setup(void)
{
    int expected = atoi(env_or(APERTURE_ENV_DEVICES, "0"));
    if (expected == 0)
        return 1;
    int n = apdev_discover();
    if (n < expected) {
        char msg[128];
        snprintf(msg, sizeof(msg), "{\"error\":\"found %d aperture devices, expected %d\"}", n, expected);
        report_check(APERTURE_CHECK_APERTURE_WINDOW, 0, msg);
        return 1;
    }
    memset(&dx, 0, sizeof(dx));
    devdax_open(&dx); /* none in this topology: the P2P checks with pmem say so */
    return 0;
}

static void devices_teardown(void)
{
    if (dx.map)
        munmap(dx.map, dx.size);
    memset(&dx, 0, sizeof(dx));
}

const struct fixture fixture_devices = {
    .name = "devices", .needs = &fixture_dax_configured, .setup = devices_setup, .enter = apdev_resync_all,
    .teardown = devices_teardown,
};

const struct daxmap *devices_daxmap(void) { return &dx; }

/* ---------------------------------------------------------------- written-log for the host */
/* Each check runs in its own child: it reports what it wrote itself, before it exits. */
static struct jbuf written;
static int nwritten;

static void record(struct apdev *d, uint64_t offset, uint64_t len, uint32_t seed)
{
    if (!nwritten++) {
        jb_init(&written);
        jb_printf(&written, "{\"type\":\"" APERTURE_MSG_WRITTEN "\",\"regions\":[");
    } else {
        jb_printf(&written, ",");
    }
    jb_printf(&written, "{\"device\":%d,\"offset\":%llu,\"len\":%llu,\"seed\":%u}", d->index,
              (unsigned long long)offset, (unsigned long long)len, seed);
}

static void written_report(void)
{
    if (!nwritten)
        return;
    jb_printf(&written, "]}");
    report_line(written.buf);
    nwritten = 0;
}

static const char *status_text(int st) { return st < 0 ? "timeout" : aperture_status_name((unsigned)st); }

/* ---------------------------------------------------------------- page budget */
/* The window check cycles through more pages than slots (when the device has them). */
static uint32_t window_pages(struct apdev *d)
{
    uint64_t want = d->nr_slots + 3ull, have = apdev_exposable_pages(d);
    return (uint32_t)(want < have ? want : have);
}

/* Scratch page k for the DMA checks: after the window check's pages, or UINT64_MAX if the device is too small. */
uint64_t scratch_page(struct apdev *d, unsigned k)
{
    uint64_t p = window_pages(d) + k;
    return p < apdev_exposable_pages(d) ? p : UINT64_MAX;
}

static size_t chunk(struct apdev *d, size_t want) { return want < d->slot ? want : (size_t)d->slot; }
/* ---------------------------------------------------------------- checks */
static int check_one_window(struct apdev *d, struct jbuf *out)
{
    int ok = 1, survived = 0, total = 0;
    unsigned retries = 0;
    const size_t len = chunk(d, 64 * KIB);
    uint32_t pages = window_pages(d); /* more pages than slots: every slot gets remapped */
    for (uint32_t s = 0; s < d->nr_slots; s++)
        ok &= apdev_slot_entry(d, s, &retries) == 0;
    int empty_at_start = ok;
    /* Write a pattern into each page through whichever slot it lands in. */
    for (uint32_t p = 0; p < pages && ok; p++) {
        ok &= apdev_fill_page(d, p % d->nr_slots, p, len, 100 + p) == 0;
        record(d, p * d->slot, len, 100 + p);
    }
    /* Map each back through a different slot and check it survived the remaps. */
    for (uint32_t p = 0; p < pages && ok; p++) {
        uint32_t slot = (p + 1) % d->nr_slots;
        total++;
        if (slot != p % d->nr_slots) /* make room: the page may still be live in another slot */
            for (uint32_t s2 = 0; s2 < d->nr_slots; s2++)
                if (s2 != slot && apdev_slot_entry(d, s2, &retries) == p + 1)
                    apdev_unmap(d, s2);
        if (apdev_map(d, slot, p) != APERTURE_ST_OK) {
            ok = 0;
            break;
        }
        ok &= apdev_slot_entry(d, slot, &retries) == p + 1;
        if (pattern_check(d->win + slot * d->slot, len, 100 + p))
            survived++;
    }
    /* One page can only be live in one slot. */
    int busy = -1;
    if (ok) {
        for (uint32_t s = 0; s < d->nr_slots; s++)
            apdev_unmap(d, s);
        apdev_map(d, 0, 0);
        busy = d->nr_slots > 1 ? apdev_map(d, 1, 0) : APERTURE_ST_EBUSY;
    }
    uint32_t gen = apdev_r32(d, APERTURE_REG_GENERATION);
    for (uint32_t s = 0; s < d->nr_slots; s++)
        apdev_unmap(d, s);
    ok = ok && empty_at_start && survived == total && busy == APERTURE_ST_EBUSY && !(gen & 1);
    jb_printf(out, "{\"device\":%d,\"ctl\":\"%s\",\"window\":\"%s\",\"window_phys\":%llu,\"window_size\":%llu,"
              "\"slot_size\":%llu,\"nr_slots\":%u,\"pages_cycled\":%u,\"survived\":%d,\"of\":%d,"
              "\"double_map\":\"%s\",\"generation\":%u,\"seqlock_retries\":%u}", d->index, d->ctl_bdf, d->win_bdf,
              d->win_phys, d->win_size, (unsigned long long)d->slot, d->nr_slots, pages, survived, total,
              busy >= 0 ? aperture_status_name((unsigned)busy) : "not run", gen, retries);
    return ok;
}

static void check_hidden(void)
{
    struct apdev *d = apdev_get(0);
    struct jbuf jb;
    jb_init(&jb);
    if (d->hidden_end <= d->hidden_start) {
        report_log("aperture.hidden_refused not run: device 0 has no non-exposable range");
        return;
    }
    uint64_t page = d->hidden_start / d->slot;
    int map_st = apdev_map(d, 0, page);
    int last_st = apdev_map(d, 0, (d->hidden_end / d->slot) - 1);
    /* The device's own DMA still reaches hidden memory: pmem -> hidden -> pmem round trip. */
    int dma_in = -1, dma_out = -1, back = 0;
    if (dx.map && dx.size >= 16 * MIB) {
        pattern_fill(dx.map + 12 * MIB, 64 * KIB, 301);
        flush_range(dx.map + 12 * MIB, 64 * KIB);
        memset(dx.map + 13 * MIB, 0, 64 * KIB);
        flush_range(dx.map + 13 * MIB, 64 * KIB);
        dma_in = apdev_dma(d, dx.phys + 12 * MIB, d->hidden_start, 64 * KIB, APERTURE_DMA_DST_LOCAL);
        dma_out = apdev_dma(d, d->hidden_start, dx.phys + 13 * MIB, 64 * KIB, APERTURE_DMA_SRC_LOCAL);
        back = pattern_check(dx.map + 13 * MIB, 64 * KIB, 301);
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
    written_report();
}

/* The P2P checks with pmem need a devdax mapping of 12 MiB or more and a scratch page; say why not if not. */
static int pmem_p2p_applies(const char *check, uint64_t page)
{
    if (!dx.map)
        report_log("%s not run: no devdax NVDIMM in this topology", check);
    else if (page == UINT64_MAX || dx.size < 12 * MIB)
        report_log("%s not run: device or devdax too small", check);
    return dx.map && page != UINT64_MAX && dx.size >= 12 * MIB;
}

static void check_pmem_to_device(void)
{
    struct apdev *d = apdev_get(0);
    const size_t len = chunk(d, 1 * MIB);
    char detail[512];
    uint64_t pin = scratch_page(d, 0);
    if (!pmem_p2p_applies("p2p.pmem_to_device", pin))
        return;
    /* pmem -> a scratch device page, verified through the window */
    pattern_fill(dx.map + 8 * MIB, len, 201);
    flush_range(dx.map + 8 * MIB, len);
    int st = apdev_dma(d, dx.phys + 8 * MIB, pin * d->slot, len, APERTURE_DMA_DST_LOCAL);
    int ok = st == 0 && apdev_map(d, 2 % d->nr_slots, pin) == 0 &&
             pattern_check(d->win + (2 % d->nr_slots) * d->slot, len, 201);
    apdev_unmap(d, 2 % d->nr_slots);
    record(d, pin * d->slot, len, 201);
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"src_phys\":%llu,\"dst_device_offset\":%llu,\"len\":%zu,"
             "\"status\":\"%s\",\"verified_through_window\":%s}", d->index, dx.phys + 8 * MIB,
             (unsigned long long)(pin * d->slot), len, status_text(st), ok ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_PMEM_TO_DEVICE, ok, detail);
    written_report();
}

static void check_device_to_pmem(void)
{
    struct apdev *d = apdev_get(0);
    const size_t len = chunk(d, 1 * MIB);
    char detail[512];
    uint64_t pout = scratch_page(d, 1);
    if (!pmem_p2p_applies("p2p.device_to_pmem", pout))
        return;
    /* a device page written through the window -> pmem, verified in the devdax mapping */
    int ok = apdev_fill_page(d, 3 % d->nr_slots, pout, len, 202) == 0 && apdev_unmap(d, 3 % d->nr_slots) == 0;
    record(d, pout * d->slot, len, 202);
    memset(dx.map + 10 * MIB, 0, len);
    flush_range(dx.map + 10 * MIB, len);
    int st = apdev_dma(d, pout * d->slot, dx.phys + 10 * MIB, len, APERTURE_DMA_SRC_LOCAL);
    ok = ok && st == 0 && pattern_check(dx.map + 10 * MIB, len, 202);
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"src_device_offset\":%llu,\"dst_phys\":%llu,\"len\":%zu,"
             "\"status\":\"%s\",\"verified_in_devdax_mapping\":%s}", d->index, (unsigned long long)(pout * d->slot),
             dx.phys + 10 * MIB, len, status_text(st), ok ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_DEVICE_TO_PMEM, ok, detail);
    written_report();
}

static void check_ram_to_device(void)
{
    struct apdev *d = apdev_get(0);
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
        st_in = apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                                              .length = pages}, NULL);
        ok_in = st_in == 0 && apdev_map(d, rs, pr) == 0 && pattern_check(d->win + rs * d->slot, pages * 4096, 203);
        apdev_unmap(d, rs);
        record(d, pr * d->slot, pages * 4096, 203);
        memset(data.buf, 0, pages * 4096);
        for (size_t i = 0; i < pages; i++)
            ents[i] = (struct aperture_list_entry){.src = pr * d->slot + i * 4096, .dst = data.phys[i],
                                                   .length = 4096, .flags = APERTURE_DMA_SRC_LOCAL};
        st_out = apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0],
                                               .length = pages}, NULL);
        ok_out = st_out == 0 && pattern_check(data.buf, pages * 4096, 203);
    }
    snprintf(detail, sizeof(detail), "{\"device\":%d,\"pages\":%zu,\"list_phys\":%llu,\"ram_to_device\":\"%s\","
             "\"device_to_ram\":\"%s\",\"verified_in\":%s,\"verified_out\":%s}", d->index, pages, table.phys[0],
             st_in < 0 ? "timeout" : aperture_status_name((unsigned)st_in),
             st_out < 0 ? "timeout" : aperture_status_name((unsigned)st_out), ok_in ? "true" : "false",
             ok_out ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_RAM_TO_DEVICE, ok_in && ok_out, detail);
    written_report();
}

static void check_device_to_device(void)
{
    struct apdev *a = apdev_get(0), *b = apdev_count() > 1 ? apdev_get(1) : NULL;
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
    int ok = apdev_fill_page(a, as, src, len, 204) == 0 && apdev_unmap(a, as) == 0;
    record(a, src * a->slot, len, 204);
    ok = ok && apdev_map(b, bs, dst) == 0;
    memset(b->win + bs * b->slot, 0, len);
    /* A's DMA engine writes into B's BAR window: lands in the page B's slot maps now. */
    int st = apdev_dma(a, src * a->slot, b->win_phys + bs * b->slot, len, APERTURE_DMA_SRC_LOCAL);
    int seen = pattern_check(b->win + bs * b->slot, len, 204);
    ok = ok && st == 0 && seen && apdev_unmap(b, bs) == 0;
    record(b, dst * b->slot, len, 204);
    snprintf(detail, sizeof(detail), "{\"src_device\":%d,\"src_offset\":%llu,\"dst_device\":%d,\"dst_window_phys\":%llu,"
             "\"dst_page\":%llu,\"len\":%zu,\"status\":\"%s\",\"seen_in_peer_window\":%s}", a->index,
             (unsigned long long)(src * a->slot), b->index, b->win_phys + bs * b->slot, (unsigned long long)dst, len,
             status_text(st), seen ? "true" : "false");
    report_check(APERTURE_CHECK_P2P_DEVICE_TO_DEVICE, ok, detail);
    written_report();
}

struct bad_case {
    const char *name;
    struct aperture_desc desc;
    int expect;
};

static void check_bad_descriptors(void)
{
    struct apdev *d = apdev_get(0);
    struct jbuf jb;
    struct rambuf table = {0};
    int ok = 1;
    jb_init(&jb);
    ram_alloc(&table, 1);
    apdev_unmap(d, d->nr_slots - 1);
    uint64_t dax_end = dx.region_end ? dx.region_end : dx.phys + dx.size;
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
        int st = apdev_cmd(d, cases[i].desc, NULL);
        int match = st == cases[i].expect;
        ok &= match;
        jb_printf(&jb, "%s{\"case\":\"%s\",\"status\":\"%s\",\"expected\":\"%s\"}", i ? "," : "", cases[i].name,
                  status_text(st), aperture_status_name((unsigned)cases[i].expect));
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
        int st = apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_DMA_LIST, .src = table.phys[0], .length = 2},
                     &result);
        int untouched = dst.buf[0] == 0xEE && dst.buf[4095] == 0xEE;
        int match = st == APERTURE_ST_EFAULT && result == 1 && untouched;
        ok &= match;
        jb_printf(&jb, ",{\"case\":\"list with a bad second entry\",\"status\":\"%s\",\"expected\":\"EFAULT\","
                  "\"failing_index\":%llu,\"first_entry_untouched\":%s}",
                  status_text(st), (unsigned long long)result,
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
            if (apdev_submit(d, junk, 64, out) == 0)
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
        uint32_t errors_before = apdev_r32(d, APERTURE_REG_ERRORS), garbage = d->sq_head + 100000;
        apdev_w32(d, APERTURE_REG_SQ_HEAD, garbage);
        apdev_doorbell(d);
        double deadline = now_s() + 5;
        while ((apdev_r32(d, APERTURE_REG_ERRORS) == errors_before || apdev_r32(d, APERTURE_REG_SQ_TAIL) != garbage) &&
               now_s() < deadline)
            usleep(100);
        int flagged = apdev_r32(d, APERTURE_REG_ERRORS) > errors_before &&
                      (apdev_r32(d, APERTURE_REG_STATUS) & APERTURE_STATUS_RING_ERROR);
        d->sq_head = apdev_r32(d, APERTURE_REG_SQ_TAIL);
        int alive = apdev_cmd(d, (struct aperture_desc){.opcode = APERTURE_OP_NOP}, NULL) == APERTURE_ST_OK;
        ok &= flagged && alive;
        jb_printf(&jb, ",{\"case\":\"garbage SQ_HEAD\",\"flagged\":%s,\"alive_after\":%s}", flagged ? "true" : "false",
                  alive ? "true" : "false");
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_APERTURE_BAD_DESCRIPTORS, ok, jb.buf);
}

/* ---------------------------------------------------------------- the checks the table runs */
static void check_window(void)
{
    struct jbuf jb;
    int ok = 1;
    jb_init(&jb);
    jb_printf(&jb, "{\"devices\":[");
    for (int i = 0; i < apdev_count(); i++) {
        if (i)
            jb_printf(&jb, ",");
        ok &= check_one_window(apdev_get(i), &jb);
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_APERTURE_WINDOW, ok, jb.buf);
    written_report();
}

/* Second boot of --reboot: what the first boot wrote through the window is still in device memory. */
static void check_persistence(void)
{
    struct jbuf jb;
    int ok = 1;
    if (!getenv(APERTURE_ENV_EXPECT))
        return;
    jb_init(&jb);
    jb_printf(&jb, "{\"devices\":[");
    for (int i = 0; i < apdev_count(); i++) {
        struct apdev *d = apdev_get(i);
        uint32_t pages = window_pages(d), intact = 0;
        size_t len = chunk(d, 64 * KIB);
        for (uint32_t p = 0; p < pages; p++) {
            if (apdev_map(d, 0, p) == APERTURE_ST_OK && pattern_check(d->win, len, 100 + p))
                intact++;
        }
        apdev_unmap(d, 0);
        ok &= intact == pages && pages > 0;
        jb_printf(&jb, "%s{\"device\":%d,\"pages_checked\":%u,\"intact\":%u}", i ? "," : "", d->index, pages,
                  intact);
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_APERTURE_PERSISTENCE, ok, jb.buf);
}

#define DEVICE_CHECK(id, check_name, function, at)                                                        \
    TEST(id, .name = check_name, .fixture = &fixture_devices, .fn = function, .tags = TAG_DEFAULT | TAG_APERTURE, \
         .order = at)

DEVICE_CHECK(check_aperture_persistence, APERTURE_CHECK_APERTURE_PERSISTENCE, check_persistence, 200);
DEVICE_CHECK(check_aperture_window, APERTURE_CHECK_APERTURE_WINDOW, check_window, 210);
DEVICE_CHECK(check_aperture_hidden_refused, APERTURE_CHECK_APERTURE_HIDDEN_REFUSED, check_hidden, 220);
DEVICE_CHECK(check_p2p_pmem_to_device, APERTURE_CHECK_P2P_PMEM_TO_DEVICE, check_pmem_to_device, 230);
DEVICE_CHECK(check_p2p_device_to_pmem, APERTURE_CHECK_P2P_DEVICE_TO_PMEM, check_device_to_pmem, 240);
DEVICE_CHECK(check_p2p_ram_to_device, APERTURE_CHECK_P2P_RAM_TO_DEVICE, check_ram_to_device, 250);
DEVICE_CHECK(check_p2p_device_to_device, APERTURE_CHECK_P2P_DEVICE_TO_DEVICE, check_device_to_device, 260);
DEVICE_CHECK(check_aperture_bad_descriptors, APERTURE_CHECK_APERTURE_BAD_DESCRIPTORS, check_bad_descriptors, 270);
