/* remap: the window workload that runs while the host remaps slots (aperture run --remap-every).
 *
 * Reads: a consistent slot-table snapshot (seqlock), then the header of a mapped slot; if the generation is
 * unchanged the header must belong to the page the table names, with a sequence number no older than the
 * last one written to that page (else: a violation). Writes: a new {page, seq} stamp through the device's
 * DMA engine (device-local, so it lands in the page whatever slot maps it). Reports the counters and the
 * last stamp of every page; the host then checks device memory holds them (remap.integrity).
 */
#define _GNU_SOURCE
#include "device.h"
#include "checks.h"
#include "report.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PAGES 4096

static void check_consistency(void)
{
    double duration = atof(env_or(APERTURE_ENV_DURATION, "10"));
    int n = apdev_discover();
    if (n <= 0) {
        report_check(APERTURE_CHECK_REMAP_CONSISTENCY, 0, "{\"error\":\"no aperture device\"}");
        return;
    }
    int hotplug = !strcmp(env_or(APERTURE_ENV_REMAP_MODE, "pause"), "hotplug");
    uint64_t reprobes = 0, reprobe_failures = 0;
    double reprobe_ms_sum = 0, reprobe_ms_max = 0;
    static uint64_t last[4][MAX_PAGES];
    uint64_t reads = 0, writes = 0, violations = 0, retries = 0, unmapped_rounds = 0, gen_changes = 0;
    uint32_t first_gen[4], prev_gen[4];
    char first_violation[256] = "";
    void *ram = NULL;
    unsigned long long ram_phys = 0;
    if (ram_page(&ram, &ram_phys) != 0) {
        report_check(APERTURE_CHECK_REMAP_CONSISTENCY, 0, "{\"error\":\"no locked RAM page\"}");
        return;
    }
    for (int i = 0; i < n; i++)
        prev_gen[i] = first_gen[i] = apdev_r32(apdev_get(i), APERTURE_REG_GENERATION);
    report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_START "\"}");
    double deadline = now_s() + duration;
    unsigned rr = 0;
    while (now_s() < deadline) {
        for (int i = 0; i < n; i++) {
            uint64_t table[APERTURE_MAX_SLOTS];
            uint32_t nslots = apdev_get(i)->nr_slots;
            int slot = -1;
            uint64_t page = 0;
            /* A burst of reads with no device command in between: they run while remaps may be happening. */
            for (int burst = 0; burst < 16; burst++) {
                double t_odd = now_s();
                uint32_t g = apdev_snapshot(apdev_get(i), table, &retries);
                if (g != prev_gen[i]) {
                    gen_changes++;
                    prev_gen[i] = g;
                    if (hotplug) {
                        /* The window device was re-plugged (maybe at a new BAR address): find it again. */
                        double t0 = now_s();
                        if (apdev_map_window(apdev_get(i), 5.0) == 0) {
                            double ms = (now_s() - (t_odd < t0 ? t_odd : t0)) * 1e3;
                            reprobes++;
                            reprobe_ms_sum += ms;
                            if (ms > reprobe_ms_max)
                                reprobe_ms_max = ms;
                        } else {
                            reprobe_failures++;
                        }
                        continue;
                    }
                }
                slot = -1;
                for (uint32_t k = 0; k < nslots; k++) {
                    uint32_t s = (rr + k) % nslots;
                    if (table[s]) {
                        slot = (int)s;
                        break;
                    }
                }
                rr++;
                if (slot < 0) {
                    unmapped_rounds++;
                    break;
                }
                page = table[slot] - 1;
                if (page >= MAX_PAGES) {
                    slot = -1;
                    break;
                }
                struct aperture_remap_stamp seen;
                if (!apdev_get(i)->win)
                    break;
                memcpy(&seen, apdev_get(i)->win + (uint64_t)slot * apdev_get(i)->slot, sizeof(seen));
                __sync_synchronize();
                if (apdev_r32(apdev_get(i), APERTURE_REG_GENERATION) != g) {
                    retries++; /* remapped between snapshot and read: not trustworthy, not a violation */
                    continue;
                }
                reads++;
                int bad = (seen.page || seen.seq) && (seen.page != page || seen.seq < last[i][page]);
                bad |= !seen.page && !seen.seq && last[i][page];
                if (bad) {
                    if (!violations)
                        snprintf(first_violation, sizeof(first_violation),
                                 "dev%d slot %d maps page %llu (gen %u) but shows page %llu seq %llu (last %llu)",
                                 i, slot, (unsigned long long)page, g, (unsigned long long)seen.page,
                                 (unsigned long long)seen.seq, (unsigned long long)last[i][page]);
                    violations++;
                }
            }
            if (slot < 0)
                continue;
            struct aperture_remap_stamp st = {page, last[i][page] + 1};
            memcpy(ram, &st, sizeof(st));
            if (apdev_dma(apdev_get(i), ram_phys, page * apdev_get(i)->slot, sizeof(st), APERTURE_DMA_DST_LOCAL) == 0) {
                last[i][page] = st.seq;
                writes++;
            }
        }
    }
    report_line("{\"type\":\"" APERTURE_MSG_PHASE "\",\"name\":\"" APERTURE_PHASE_REMAP_END "\"}");
    struct jbuf jb;
    jb_init(&jb);
    jb_printf(&jb, "{\"guest_reprobes\":%llu,\"guest_reprobe_failures\":%llu,\"guest_reprobe_ms_avg\":%.2f,"
              "\"guest_reprobe_ms_max\":%.2f,", (unsigned long long)reprobes, (unsigned long long)reprobe_failures,
              reprobes ? reprobe_ms_sum / (double)reprobes : 0.0, reprobe_ms_max);
    jb_printf(&jb, "\"reads\":%llu,\"writes\":%llu,\"violations\":%llu,\"seqlock_retries\":%llu,"
              "\"generation_changes_seen\":%llu,\"rounds_without_mapped_slot\":%llu,\"stale_completions\":%llu,"
              "\"devices\":%d,\"first_violation\":",
              (unsigned long long)reads, (unsigned long long)writes, (unsigned long long)violations,
              (unsigned long long)retries, (unsigned long long)gen_changes, (unsigned long long)unmapped_rounds,
              apdev_stale_completions(), n);
    jb_str(&jb, first_violation);
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_REMAP_CONSISTENCY, violations == 0 && reads > 0 && writes > 0 && !reprobe_failures, jb.buf);
    /* The last stamp of every page written, for the host's device-memory check. */
    struct jbuf out;
    jb_init(&out);
    jb_printf(&out, "{\"type\":\"" APERTURE_MSG_STAMPS "\",\"stamps\":[");
    int first = 1;
    for (int i = 0; i < n; i++)
        for (uint32_t p = 0; p < MAX_PAGES; p++)
            if (last[i][p]) {
                jb_printf(&out, "%s[%d,%u,%llu]", first ? "" : ",", i, p, (unsigned long long)last[i][p]);
                first = 0;
            }
    jb_printf(&out, "]}");
    report_line(out.buf);
}

TEST(check_remap_consistency, .name = APERTURE_CHECK_REMAP_CONSISTENCY, .fn = check_consistency, .timeout_s = 120,
     .plus_duration = 1, .order = 600, .tags = TAG_REMAP);
