/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The aperture guest driver's character device, /dev/apertureN (N = the device index): what userspace (the
 * helper's checks, a user's own test program) asks of it. See docs/device-abi.md, "The guest driver".
 */
#ifndef APERTURE_UAPI_H
#define APERTURE_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Migrate [addr, addr + npages pages) of the caller's memory into device memory (device-private pages). */
struct aperture_migrate {
	__u64 addr;      /* page aligned */
	__u64 npages;    /* at most APERTURE_MIGRATE_MAX_PAGES */
	__u64 offsets;   /* optional user pointer to npages __u64: each page's device offset, or ~0 if not moved */
	__u32 flags;     /* APERTURE_MIGRATE_* */
	__u32 reserved;  /* must be 0 */
	__u64 migrated;  /* out: pages now in device memory */
};

#define APERTURE_MIGRATE_HIDDEN 0x1 /* take device pages from the hidden (never exposable) ranges */
#define APERTURE_MIGRATE_MAX_PAGES (1ULL << 18)

/* Map the device-private page at addr into a window slot for a peer. */
struct aperture_peer_map {
	__u64 addr;        /* in: page-aligned address of a page of the caller's that is in this device's memory */
	__u64 id;          /* out: the mapping; mmap(fd, offset = id * page size, length = page size) maps it */
	__u64 bus_addr;    /* out: what a peer DMAs to (the window BAR + slot + offset in the device page) */
	__u64 dev_offset;  /* out: the page's offset in device memory */
	__u32 slot;        /* out: the window slot, pinned until APERTURE_IOC_PEER_UNMAP */
	__u32 reserved;
};

struct aperture_stats {
	__u64 migrate_calls;
	__u64 pages_to_device;
	__u64 bytes_to_device;
	__u64 faults;          /* CPU faults on device pages (migrate_to_ram) */
	__u64 pages_to_ram;
	__u64 bytes_to_ram;
	__u64 peer_maps;
	__u64 peer_unmaps;
	__u64 evictions;       /* a peer map took a slot that held another page */
	__u64 map_retries;     /* the host remapped under a peer map before its pin: looked again */
	__u64 device_pages;    /* device pages in use now */
	__u64 pinned_slots;    /* slots pinned now */
	__u64 dma_errors;
	__u64 evicted_at_unbind;
};

struct aperture_info {
	__u32 index;
	__u32 nr_slots;
	__u64 devmem;
	__u64 window;
	__u64 slot_size;
	__u64 window_bus;      /* bus address of the window BAR */
	__u64 p2p_pages;       /* the window's P2PDMA pages (ZONE_DEVICE) */
};

#define APERTURE_IOC_MIGRATE    _IOWR('A', 1, struct aperture_migrate)
#define APERTURE_IOC_PEER_MAP   _IOWR('A', 2, struct aperture_peer_map)
#define APERTURE_IOC_PEER_UNMAP _IOW('A', 3, __u64)
#define APERTURE_IOC_STATS      _IOR('A', 4, struct aperture_stats)
#define APERTURE_IOC_INFO       _IOR('A', 5, struct aperture_info)

#endif
