/* The aperture device driver, from userspace: discovery (sysfs resource files), the rings, MAP/UNMAP/DMA, the
 * window's slot table (seqlock reads) and re-probing a re-plugged window. Checks, benchmarks and tools use
 * this and nothing below it. */
#ifndef APERTURE_DEVICE_H
#define APERTURE_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "aperture_abi.h"

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
    uint32_t doorbell; /* what to write to the Doorbell register: DOORBELL_PEER << 16 | vector 0 */
    uint64_t hidden_start, hidden_end;
    int driver_owned; /* bound to the guest driver: the helper leaves its rings alone */
};

static inline uint32_t apdev_r32(struct apdev *d, unsigned off) { return *(volatile uint32_t *)(d->ctl + off); }
static inline uint64_t apdev_r64(struct apdev *d, unsigned off) { return *(volatile uint64_t *)(d->ctl + off); }
static inline void apdev_w32(struct apdev *d, unsigned off, uint32_t v) { *(volatile uint32_t *)(d->ctl + off) = v; }

/* Discovery: every aperture device with a mapped window, sorted by device index. */
int apdev_discover(void);
int apdev_count(void);
struct apdev *apdev_get(int i); /* i < apdev_count() */
int apdev_map_window(struct apdev *d, double wait_s); /* (re)map the window BAR; waits for a re-plug */

/* Rings. Every call returns the completion status (APERTURE_ST_*) or -1 when the device did not answer in 5 s. */
int apdev_submit(struct apdev *d, struct aperture_desc *descs, int n, struct aperture_compl *out); /* 0 or -1 */
int apdev_cmd(struct apdev *d, struct aperture_desc desc, uint64_t *result);
int apdev_map(struct apdev *d, uint32_t slot, uint64_t page);
int apdev_unmap(struct apdev *d, uint32_t slot);
int apdev_dma(struct apdev *d, uint64_t src, uint64_t dst, uint64_t len, uint16_t flags);
void apdev_doorbell(struct apdev *d);
/* Start again from the device's ring indices (after a fuzzer, or in a forked check whose parent's copy is stale). */
void apdev_resync(struct apdev *d);
void apdev_resync_all(void);
unsigned long long apdev_stale_completions(void);
uint32_t apdev_next_tag(void);

/* Pages the guest may map: up to the first hidden page. */
uint64_t apdev_exposable_pages(struct apdev *d);

/* The slot table. */
uint64_t apdev_slot_entry(struct apdev *d, uint32_t slot, unsigned *retries); /* page + 1, or 0: empty */
uint32_t apdev_snapshot(struct apdev *d, uint64_t *table, uint64_t *retries); /* returns the (even) generation */
int apdev_fill_page(struct apdev *d, uint32_t slot, uint64_t page, size_t len, uint32_t seed); /* map + pattern */

/* Guest memory the device can DMA to: n 4 KiB pages, locked, with their physical addresses. */
struct rambuf {
    uint8_t *buf;
    size_t pages;
    unsigned long long phys[1024];
};
int ram_alloc(struct rambuf *r, size_t pages);
int ram_page(void **buf, unsigned long long *phys); /* one page, kept for the life of the process */

/* The first devdax device, mapped, for P2P between the NVDIMM and the devices. */
struct daxmap {
    uint8_t *map;
    size_t size;
    unsigned long long phys;       /* of map[0] */
    unsigned long long region_end; /* end of the NVDIMM region holding it */
};
int devdax_open(struct daxmap *dx);

#endif
