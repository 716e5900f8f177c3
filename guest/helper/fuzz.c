/* aperture.fuzz: a hostile guest of our own. For $aperture_duration seconds it writes random descriptors (wild
 * and plausible addresses, every opcode, garbage flags and reserved fields), garbage ring indices, random
 * control-memory registers, doorbell storms, and garbage lines on the results channel. It reports what it
 * sent and the statuses it saw; ok when every device still answers a NOP afterwards. The host adds what only
 * it can see: files outside the device's reach unchanged, no error in its device thread. */
#define _GNU_SOURCE
#include "checks.h"
#include "report.h"
#include "device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_STATUS 16
#define MAX_LONG_LINES 32 /* 48 MiB in all */

struct fuzz_stats {
    unsigned long long descriptors, doorbells, register_writes, index_garbage, garbage_lines, long_lines, completions;
    unsigned long long status[MAX_STATUS + 1]; /* the last bucket: statuses the ABI does not name */
};

static uint64_t rng_state;
static uint64_t table_phys; /* the DMA_LIST table page: read by the device, never written by it */

/* A locked, zeroed page and its physical address (pagemap). */
static void *locked_page(unsigned long long *phys)
{
    void *p = aligned_alloc(4096, 4096);

    if (!p)
        return NULL;
    memset(p, 0, 4096);
    if (mlock(p, 4096) != 0) {
        free(p);
        return NULL;
    }
    *phys = virt_to_phys(p);
    return *phys ? p : NULL;
}

static uint64_t rnd(void)
{
    /* xorshift64*: reproducible from the seed the report names */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static uint64_t wild_length(void)
{
    switch (rnd() % 5) {
    case 0: return 0;
    case 1: return rnd() % 8192;
    case 2: return APERTURE_MAX_DMA_LENGTH + (rnd() % 2);
    case 3: return rnd() % (APERTURE_MAX_LIST_ENTRIES + 2);
    default: return rnd();
    }
}

/* A source worth trying: our page and its edges, the window, the PCI hole, RAM, 2^64 overflows, anything. */
static uint64_t wild_source(int dev, uint64_t ram_phys)
{
    switch (rnd() % 6) {
    case 0: return ram_phys + (rnd() % 8192) - 4096;
    case 1: return apdev_get(dev)->win_phys + (rnd() % (32ULL << 20));
    case 2: return 0xfe000000ULL + (rnd() % (32ULL << 20)); /* the PCI hole: registers, other BARs */
    case 3: return ~0ULL - (rnd() % 8192);                   /* 2^64 overflows */
    case 4: return rnd() % (4ULL << 30);
    default: return rnd();
    }
}

/* A destination that may be refused but never lands in guest RAM outside our own page: the device does what a
 * descriptor says, so a write into the kernel's memory would be this guest attacking itself, not the host. */
static uint64_t wild_destination(int dev, uint64_t ram_phys)
{
    switch (rnd() % 6) {
    case 0: return ram_phys + (rnd() % 4096);                /* in our page; a long length crosses out: ECROSS */
    case 1: return apdev_get(dev)->win_phys + (rnd() % (32ULL << 20));
    case 2: return 0xfe000000ULL + (rnd() % (32ULL << 20));
    case 3: return ~0ULL - (rnd() % 8192);
    case 4: return (1ULL << 40) + (rnd() % (1ULL << 36));    /* nothing is mapped there */
    default: return (rnd() | (1ULL << 41));
    }
}

/* RAM is one region to the device: a write that starts in our scratch page and runs past it would land in the
 * kernel's memory. Keep it inside the page, or make it one the device refuses outright (too big). */
static uint64_t clamp_length(uint64_t dst, uint64_t len, uint16_t flags, uint64_t ram_phys)
{
    if ((flags & APERTURE_DMA_DST_LOCAL) || dst < ram_phys || dst >= ram_phys + 4096 ||
        len <= ram_phys + 4096 - dst)
        return len;
    return rnd() % 2 ? ram_phys + 4096 - dst : APERTURE_MAX_DMA_LENGTH + 1;
}

/* The table page as a DMA_LIST table of random entries (safe destinations), rewritten now and then. It is never
 * a destination itself (ram_phys below is the scratch page): device writes cannot turn it into unsafe entries. */
static void fill_list_page(uint8_t *page, int dev, uint64_t ram_phys)
{
    for (int i = 0; i < 4096 / 32; i++) {
        uint64_t *e = (uint64_t *)(page + i * 32);
        uint16_t flags = (uint16_t)(rnd() % 4);

        e[0] = flags & APERTURE_DMA_SRC_LOCAL ? rnd() % (512ULL << 20) : wild_source(dev, ram_phys);
        e[1] = flags & APERTURE_DMA_DST_LOCAL ? rnd() % (512ULL << 20) : wild_destination(dev, ram_phys);
        e[2] = clamp_length(e[1], wild_length(), flags, ram_phys);
        e[3] = rnd() % 8 ? flags : rnd();
    }
}

static void random_descriptors(int dev, uint64_t ram_phys, struct fuzz_stats *st)
{
    /* A DMA_LIST table, a DMA's destination or a local copy of device memory may come from anywhere the
     * device can read; writes go only where wild_destination() aims. */
    volatile uint8_t *ctl = apdev_get(dev)->ctl;
    uint32_t head = *(volatile uint32_t *)(ctl + APERTURE_REG_SQ_HEAD);
    int n = 1 + (int)(rnd() % 16);

    for (int i = 0; i < n; i++) {
        struct aperture_desc desc;

        memset(&desc, 0, sizeof(desc));
        desc.opcode = (uint16_t)(rnd() % 7);
        desc.flags = rnd() % 4 ? (uint16_t)(rnd() % 4) : (uint16_t)rnd();
        desc.tag = (uint32_t)rnd();
        desc.slot = rnd() % 2 ? (uint32_t)(rnd() % 10) : (uint32_t)rnd();
        desc.page = rnd() % 2 ? rnd() % 200 : rnd();
        desc.src = wild_source(dev, ram_phys);
        desc.dst = wild_destination(dev, ram_phys);
        desc.length = wild_length();
        if (desc.opcode == APERTURE_OP_DMA_LIST) /* the table: our page of safe entries, or nothing readable */
            desc.src = rnd() % 4 ? table_phys : wild_destination(dev, ram_phys);
        desc.length = clamp_length(desc.dst, desc.length, desc.flags, ram_phys);
        if (rnd() % 8 == 0)
            desc.reserved0 = (uint32_t)rnd();
        memcpy((void *)(ctl + APERTURE_REG_SQ + ((head + (uint32_t)i) % APERTURE_RING_ENTRIES) * 64), &desc,
               sizeof(desc));
    }
    __sync_synchronize();
    *(volatile uint32_t *)(ctl + APERTURE_REG_SQ_HEAD) = head + (uint32_t)n;
    apdev_doorbell(apdev_get(dev));
    st->descriptors += (unsigned long long)n;
    st->doorbells++;
    /* Collect what completes within a few ms; never wait on a guest-corrupted ring for long. */
    double deadline = now_s() + 0.005;
    uint32_t tail = *(volatile uint32_t *)(ctl + APERTURE_REG_CQ_TAIL);
    while (now_s() < deadline) {
        uint32_t chead = *(volatile uint32_t *)(ctl + APERTURE_REG_CQ_HEAD);
        if (chead == tail)
            continue;
        if ((uint32_t)(chead - tail) > APERTURE_RING_ENTRIES) {
            tail = chead;
            break;
        }
        struct aperture_compl c;
        memcpy(&c, (const void *)(ctl + APERTURE_REG_CQ + (tail % APERTURE_RING_ENTRIES) * 16), sizeof(c));
        st->status[c.status < MAX_STATUS ? c.status : MAX_STATUS]++;
        st->completions++;
        tail++;
    }
    *(volatile uint32_t *)(ctl + APERTURE_REG_CQ_TAIL) = tail;
}

static void garbage_indices(int dev, struct fuzz_stats *st)
{
    volatile uint8_t *ctl = apdev_get(dev)->ctl;
    unsigned reg = rnd() % 2 ? APERTURE_REG_SQ_HEAD : APERTURE_REG_CQ_TAIL;

    *(volatile uint32_t *)(ctl + reg) = (uint32_t)rnd();
    apdev_doorbell(apdev_get(dev));
    st->index_garbage++;
    st->doorbells++;
}

static void register_writes(int dev, struct fuzz_stats *st)
{
    volatile uint8_t *ctl = apdev_get(dev)->ctl;
    /* Anywhere in the register page, the slot table or the rings: the host must trust none of it. */
    unsigned off = (unsigned)(rnd() % (APERTURE_REG_CQ + APERTURE_RING_ENTRIES * 16)) & ~3u;

    *(volatile uint32_t *)(ctl + off) = (uint32_t)rnd();
    st->register_writes++;
    if (rnd() % 2) {
        apdev_doorbell(apdev_get(dev));
        st->doorbells++;
    }
}

static void results_garbage(struct fuzz_stats *st)
{
    static char line[8192];
    size_t len = 1 + rnd() % (sizeof(line) - 2);

    /* Now and then a line longer than the host takes (1 MiB): 1.5 MiB, then its newline. At most MAX_LONG_LINES
     * of them: the host stops a guest that writes more than 256 MiB on the channel as a flood, and a soak runs
     * for minutes. */
    if (st->long_lines < MAX_LONG_LINES && rnd() % 16 == 0) {
        memset(line, 'x', sizeof(line));
        for (int i = 0; i < 192; i++)
            report_raw(line, sizeof(line));
        report_raw("\n", 1);
        st->garbage_lines++;
        st->long_lines++;
        return;
    }
    switch (rnd() % 3) {
    case 0: memset(line, '[', len); break;                     /* deep nesting */
    case 1: for (size_t i = 0; i < len; i++) line[i] = (char)(rnd() % 256 ?: 1); break;
    default: snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_CHECK "\",\"name\":%llu}", (unsigned long long)rnd());
             len = strlen(line);
    }
    line[len] = '\n';
    report_raw(line, len + 1);
    st->garbage_lines++;
}

static void check_fuzz(void)
{
    struct fuzz_stats st;
    struct jbuf jb;
    void *ram, *table;
    unsigned long long ram_phys = 0, tphys = 0, seed;
    double duration = atof(env_or(APERTURE_ENV_DURATION, "5")), t0;
    int n = apdev_discover(), remaps = atoi(env_or(APERTURE_ENV_REMAP, "0"));

    memset(&st, 0, sizeof(st));
    seed = strtoull(env_or(APERTURE_ENV_STAMP, "1"), NULL, 16) | 1;
    rng_state = seed;
    /* a DMA_LIST whose table is our page reads entries from it: fill it before the first one */
    ram = locked_page(&ram_phys);
    table = locked_page(&tphys);
    if (!ram || !table) {
        report_check(APERTURE_CHECK_APERTURE_FUZZ, 0, "{\"error\":\"no locked RAM pages for DMA\"}");
        return;
    }
    table_phys = tphys;
    fill_list_page(table, 0, ram_phys);
    if (remaps)
        report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_START "\"}");
    t0 = now_s();
    while (n > 0 && now_s() - t0 < duration) {
        int dev = (int)(rnd() % (uint64_t)n);
        unsigned action = (unsigned)(rnd() % 100);

        if (action < 2)
            fill_list_page(table, dev, ram_phys);
        else if (action < 70)
            random_descriptors(dev, ram_phys, &st);
        else if (action < 80)
            garbage_indices(dev, &st);
        else if (action < 92)
            register_writes(dev, &st);
        else if (action < 97) {
            for (int i = 0; i < 50; i++)
                apdev_doorbell(apdev_get(dev));
            st.doorbells += 50;
        } else {
            results_garbage(&st);
        }
    }
    if (remaps)
        report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_END "\"}");
    /* Give the device a moment to finish what is queued, then check each one still serves a NOP. */
    usleep(200000);
    jb_init(&jb);
    jb_printf(&jb, "{\"seed\":\"%llx\",\"duration_s\":%.1f,\"devices\":%d,\"descriptors\":%llu,\"doorbells\":%llu,"
              "\"register_writes\":%llu,\"index_garbage\":%llu,\"results_garbage_lines\":%llu,"
              "\"results_long_lines\":%llu,"
              "\"completions_seen\":%llu,\"statuses\":{", seed, now_s() - t0, n, st.descriptors, st.doorbells,
              st.register_writes, st.index_garbage, st.garbage_lines, st.long_lines, st.completions);
    int first = 1;
    for (unsigned s = 0; s <= MAX_STATUS; s++) {
        if (!st.status[s])
            continue;
        jb_printf(&jb, "%s\"%s\":%llu", first ? "" : ",", s < MAX_STATUS ? aperture_status_name(s) : "other",
                  st.status[s]);
        first = 0;
    }
    jb_printf(&jb, "},\"alive\":[");
    int alive = n > 0;
    for (int i = 0; i < n; i++) {
        apdev_resync(apdev_get(i));
        int nop = apdev_cmd(apdev_get(i), (struct aperture_desc){.opcode = APERTURE_OP_NOP}, NULL);
        if (nop != APERTURE_ST_OK) { /* a fuzzed register may still be settling: resynchronise once more */
            usleep(100000);
            apdev_resync(apdev_get(i));
            nop = apdev_cmd(apdev_get(i), (struct aperture_desc){.opcode = APERTURE_OP_NOP}, NULL);
        }
        jb_printf(&jb, "%s%s", i ? "," : "", nop == APERTURE_ST_OK ? "true" : "false");
        alive = alive && nop == APERTURE_ST_OK;
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_APERTURE_FUZZ, alive && st.descriptors > 0, jb.buf);
}

TEST(check_aperture_fuzz, .name = APERTURE_CHECK_APERTURE_FUZZ, .fn = check_fuzz, .timeout_s = 120, .plus_duration = 1,
     .order = 700, .tags = TAG_FUZZ);
