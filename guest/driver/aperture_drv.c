// SPDX-License-Identifier: GPL-2.0
/*
 * aperture_drv: a guest driver for aperture devices.
 *
 * An aperture device has device memory the CPU cannot address: only a small BAR
 * window of slots shows device pages, one per slot, and the host remaps the
 * window underneath. This driver gives the kernel what it needs to use such
 * memory:
 *
 * - Device memory as MEMORY_DEVICE_PRIVATE pages (memremap_pages). Userspace
 *   migrates its memory there (migrate_vma_*); a CPU fault brings a page back
 *   (migrate_to_ram). Every copy is done by the device's own DMA engine through
 *   descriptors, never by the CPU.
 * - The window BAR as P2PDMA memory (pci_p2pdma_add_resource): its pages are
 *   ZONE_DEVICE pages a peer (an NVMe controller, the other aperture device)
 *   can DMA to.
 * - "Map this page for a peer": a device-private page gets a window slot (a
 *   free one, else an unpinned one is evicted), the slot is pinned in control
 *   memory (SLOT_PIN, device ABI 1.2) so the host's remaps leave it alone, and
 *   the caller gets the P2P page (mmap) and its bus address. Pages of hidden
 *   ranges: -EACCES.
 *
 * The driver binds only devices it is asked to (driver_override), so the
 * userspace helper keeps the others. The device ABI is guest/abi.py, generated
 * into aperture_abi.h; the ioctls are aperture_uapi.h.
 */
#include <linux/bitmap.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/io.h>
#include <linux/kref.h>
#include <linux/ktime.h>
#include <linux/memremap.h>
#include <linux/migrate.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pagemap.h>
#include <linux/pci.h>
#include <linux/pci-p2pdma.h>
#include <linux/rwsem.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "aperture_abi.h"
#include "aperture_uapi.h"

#define APDRV_NAME		"aperture"
#define APDRV_DMA_TIMEOUT_MS	5000
#define APDRV_CHUNK		512	/* pages per migration step: one DMA_LIST */
#define APDRV_MAX_PEERS		64	/* peer mappings per device */
#define APDRV_MAP_TRIES		16
#define APDRV_UNMAP_WAIT_MS	2000
#define APDRV_DOORBELL		12	/* ivshmem BAR0 Doorbell register */

struct apdrv_peer {
	u64 id;			/* 0: free */
	struct file *owner;
	unsigned long dpage;	/* device page index (PAGE_SIZE units) */
	u32 slot;
	struct page *p2p;
};

/* One migration step's arrays (too big for the stack). */
struct apdrv_step {
	unsigned long src[APDRV_CHUNK];
	unsigned long dst[APDRV_CHUNK];
	unsigned long dpages[APDRV_CHUNK];
	struct page *sys[APDRV_CHUNK];
	struct page *dev[APDRV_CHUNK];
	unsigned int idx[APDRV_CHUNK];
};

struct apdrv {
	struct pci_dev *pdev;
	struct pci_dev *win;
	void __iomem *regs;
	void __iomem *ctl;
	u32 index;
	u64 devmem;
	u64 window;
	u64 slot_size;
	u32 nr_slots;
	u32 nr_hidden;
	u64 hidden[APERTURE_MAX_HIDDEN][2];
	u32 doorbell;		/* DOORBELL_PEER << 16 | vector 0 */

	/* the submission and completion rings */
	struct mutex ring_lock;
	struct mutex list_lock;	/* the DMA list buffer */
	u32 sq_head;
	u32 cq_tail;
	u32 tag;
	struct aperture_list_entry *list;
	dma_addr_t list_dma;
	dma_addr_t list_addr[APDRV_CHUNK];	/* the pages the list names, mapped for DMA */

	/* device memory as device-private pages */
	struct dev_pagemap pgmap;
	struct resource *res;
	unsigned long pfn_first;
	unsigned long npages;
	spinlock_t alloc_lock;	/* the bitmaps and cursors */
	unsigned long *used;
	unsigned long *hidden_map;
	unsigned long *peer_held;	/* freed while a peer holds it: free at peer unmap */
	unsigned long *zombie;
	unsigned long cursor;
	unsigned long hidden_cursor;

	/* the window */
	void *p2p_base;
	struct mutex slot_lock;	/* pins, peers, slot choice */
	struct mutex notifier_lock;	/* peer-map lookups against CPU page-table changes */
	u32 pins[APERTURE_MAX_SLOTS];
	u32 victim;
	struct apdrv_peer peers[APDRV_MAX_PEERS];
	u64 next_peer_id;

	struct miscdevice misc;
	char name[16];
	struct kref ref;		/* the device, and each open file */
	struct rw_semaphore gone_lock;	/* ioctl and release against unbind */
	bool gone;			/* unbound: files still open get -ENODEV */
	struct aperture_stats stats;	/* under slot_lock, or ring_lock for the DMA counters */
	atomic64_t faults;
};

/* ------------------------------------------------------------------ the rings */

static int apdrv_status_errno(u16 status)
{
	switch (status) {
	case APERTURE_ST_OK:
		return 0;
	case APERTURE_ST_ERANGE:
		return -ERANGE;
	case APERTURE_ST_EACCES:
		return -EACCES;
	case APERTURE_ST_EFAULT:
	case APERTURE_ST_ECROSS:
		return -EFAULT;
	case APERTURE_ST_ETOOBIG:
		return -E2BIG;
	case APERTURE_ST_EBUSY:
		return -EBUSY;
	case APERTURE_ST_ENOMAP:
		return -ENXIO;
	default:
		return -EINVAL;
	}
}

/* Start from the device's own indices (another user of the device may have left them anywhere). */
static void apdrv_resync(struct apdrv *ad)
{
	ad->cq_tail = readl(ad->ctl + APERTURE_REG_CQ_HEAD);
	writel(ad->cq_tail, ad->ctl + APERTURE_REG_CQ_TAIL);
	ad->sq_head = readl(ad->ctl + APERTURE_REG_SQ_TAIL);
	writel(ad->sq_head, ad->ctl + APERTURE_REG_SQ_HEAD);
}

/*
 * Submit one descriptor and wait for its completion (matched by tag). Sleeps;
 * the host device model is a process on the host, so a completion takes
 * microseconds to milliseconds. A device that does not answer in
 * APDRV_DMA_TIMEOUT_MS gets -ETIMEDOUT and the rings are resynchronised.
 */
static int apdrv_submit(struct apdrv *ad, struct aperture_desc *desc, u64 *result)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(APDRV_DMA_TIMEOUT_MS);
	struct aperture_compl c;
	unsigned int spins = 0;
	u32 head;
	int ret;

	mutex_lock(&ad->ring_lock);
	desc->tag = ++ad->tag;
	memcpy_toio(ad->ctl + APERTURE_REG_SQ +
		    (ad->sq_head % APERTURE_RING_ENTRIES) * sizeof(*desc), desc, sizeof(*desc));
	ad->sq_head++;
	wmb();	/* the descriptor before the index that publishes it */
	writel(ad->sq_head, ad->ctl + APERTURE_REG_SQ_HEAD);
	writel(ad->doorbell, ad->regs + APDRV_DOORBELL);
	for (;;) {
		head = readl(ad->ctl + APERTURE_REG_CQ_HEAD);
		rmb();	/* the completion after the index that published it */
		while (ad->cq_tail != head) {
			memcpy_fromio(&c, ad->ctl + APERTURE_REG_CQ +
				      (ad->cq_tail % APERTURE_RING_ENTRIES) * sizeof(c), sizeof(c));
			ad->cq_tail++;
			writel(ad->cq_tail, ad->ctl + APERTURE_REG_CQ_TAIL);
			if (c.tag == desc->tag) {
				ret = apdrv_status_errno(c.status);
				if (result)
					*result = c.result;
				goto out;
			}
		}
		if (time_after(jiffies, deadline)) {
			apdrv_resync(ad);
			ret = -ETIMEDOUT;
			goto out;
		}
		if (++spins < 64)
			cpu_relax();
		else
			usleep_range(10, 50);
	}
out:
	if (ret)
		ad->stats.dma_errors++;
	mutex_unlock(&ad->ring_lock);
	return ret;
}

/* DMA_LIST over the first n entries of ad->list (the caller holds list_lock). */
static int apdrv_dma_list(struct apdrv *ad, unsigned int n)
{
	struct aperture_desc d = {
		.opcode = APERTURE_OP_DMA_LIST,
		.src = ad->list_dma,
		.length = n,
	};

	return n ? apdrv_submit(ad, &d, NULL) : 0;
}

static int apdrv_map_slot(struct apdrv *ad, u32 slot, u64 page)
{
	struct aperture_desc d = { .opcode = APERTURE_OP_MAP, .slot = slot, .page = page };

	return apdrv_submit(ad, &d, NULL);
}

/*
 * ------------------------------------------------------------------ the
 * window's slot table and pins
 */

/* The slot showing device page ap (slot-size units), read under the host's seqlock; -1 if none. */
static int apdrv_slot_of(struct apdrv *ad, u64 ap)
{
	u32 gen, slot;
	int found;

	do {
		while ((gen = readl(ad->ctl + APERTURE_REG_GENERATION)) & 1)
			cpu_relax();
		rmb();	/* the entries after the generation */
		found = -1;
		for (slot = 0; slot < ad->nr_slots; slot++)
			if (readq(ad->ctl + APERTURE_REG_SLOT_TABLE + 8 * slot) == ap + 1)
				found = slot;
		rmb();	/* the generation again after the entries */
	} while (readl(ad->ctl + APERTURE_REG_GENERATION) != gen);
	return found;
}

static void apdrv_pin(struct apdrv *ad, u32 slot)
{
	if (ad->pins[slot]++ == 0) {
		writel(1, ad->ctl + APERTURE_REG_SLOT_PIN + 4 * slot);
		mb();	/* the pin is visible before we look at the slot again */
		ad->stats.pinned_slots++;
	}
}

static void apdrv_unpin(struct apdrv *ad, u32 slot)
{
	if (--ad->pins[slot] == 0) {
		writel(0, ad->ctl + APERTURE_REG_SLOT_PIN + 4 * slot);
		ad->stats.pinned_slots--;
	}
}

/*
 * Give device page ap a pinned slot. The host may remap any unpinned slot at
 * any time (with the VM paused), so a slot is pinned first and then checked (or
 * mapped); a page the host moved meanwhile is looked up again.
 */
static int apdrv_get_slot(struct apdrv *ad, u64 ap, u32 *out)
{
	int tries, slot, ret;
	u32 k;

	lockdep_assert_held(&ad->slot_lock);
	for (tries = 0; tries < APDRV_MAP_TRIES; tries++) {
		slot = apdrv_slot_of(ad, ap);
		if (slot >= 0) {
			apdrv_pin(ad, slot);
			if (apdrv_slot_of(ad, ap) == slot) {
				*out = slot;
				return 0;
			}
			apdrv_unpin(ad, slot);
			ad->stats.map_retries++;
			continue;
		}
		/* A free, unpinned slot; else evict an unpinned one, round robin. */
		slot = -1;
		for (k = 0; k < ad->nr_slots; k++)
			if (!ad->pins[k] && !readq(ad->ctl + APERTURE_REG_SLOT_TABLE + 8 * k)) {
				slot = k;
				break;
			}
		for (k = 0; slot < 0 && k < ad->nr_slots; k++) {
			u32 v = (ad->victim + k) % ad->nr_slots;

			if (!ad->pins[v]) {
				slot = v;
				ad->victim = v + 1;
				ad->stats.evictions++;
			}
		}
		if (slot < 0)
			return -EBUSY;	/* every slot is pinned by a peer */
		apdrv_pin(ad, slot);
		ret = apdrv_map_slot(ad, slot, ap);
		if (!ret && apdrv_slot_of(ad, ap) == slot) {
			*out = slot;
			return 0;
		}
		apdrv_unpin(ad, slot);
		if (ret && ret != -EBUSY)
			return ret;
		/* the host put the page in another slot meanwhile */
		ad->stats.map_retries++;
	}
	return -EAGAIN;
}

/* ------------------------------------------------------------------ device-private pages */

static inline struct apdrv *apdrv_of_page(struct page *page)
{
	return container_of(page->pgmap, struct apdrv, pgmap);
}

static inline unsigned long apdrv_dpage(struct apdrv *ad, struct page *page)
{
	return page_to_pfn(page) - ad->pfn_first;
}

static inline u64 apdrv_dev_offset(struct apdrv *ad, unsigned long dpage)
{
	return (u64)dpage << PAGE_SHIFT;
}

/*
 * Up to want free device pages, from the hidden ranges or from the rest: next fit,
 * a block at a time downwards from the top of device memory (a freed page is
 * reused last), ascending inside a block (a migration step lands contiguous).
 */
static unsigned int apdrv_alloc_dpages(struct apdrv *ad, bool hidden, unsigned int want,
				       struct page **out)
{
	unsigned long *cursor = hidden ? &ad->hidden_cursor : &ad->cursor;
	unsigned long top, bottom, i, scanned = 0;
	unsigned int got = 0;

	spin_lock(&ad->alloc_lock);
	while (got < want && scanned < ad->npages) {
		top = *cursor;
		bottom = top + 1 >= want - got ? top + 1 - (want - got) : 0;
		for (i = bottom; i <= top && got < want; i++) {
			if (test_bit(i, ad->used) || test_bit(i, ad->hidden_map) != hidden)
				continue;
			__set_bit(i, ad->used);
			out[got++] = pfn_to_page(ad->pfn_first + i);
		}
		scanned += top + 1 - bottom;
		*cursor = bottom ? bottom - 1 : ad->npages - 1;
	}
	ad->stats.device_pages += got;
	spin_unlock(&ad->alloc_lock);
	return got;
}

static void apdrv_page_free(struct page *page)
{
	struct apdrv *ad = apdrv_of_page(page);
	unsigned long i = apdrv_dpage(ad, page);

	spin_lock(&ad->alloc_lock);
	if (test_bit(i, ad->peer_held)) {
		/* a peer may still DMA to it: reuse it after the peer unmap */
		__set_bit(i, ad->zombie);
	} else {
		__clear_bit(i, ad->used);
		ad->stats.device_pages--;
	}
	spin_unlock(&ad->alloc_lock);
}

/*
 * Copy between system pages and device pages with one DMA_LIST. to_device:
 * system -> device. sys[i] may be NULL when copying to the device (a page never
 * touched: the zero page is copied).
 */
static int apdrv_copy(struct apdrv *ad, struct page **sys, unsigned long *dpages,
		      unsigned int n, bool to_device)
{
	enum dma_data_direction dir = to_device ? DMA_TO_DEVICE : DMA_FROM_DEVICE;
	dma_addr_t *addr = ad->list_addr;
	unsigned int i, mapped;
	int ret = 0;

	if (WARN_ON(n > APDRV_CHUNK))
		return -EINVAL;
	mutex_lock(&ad->list_lock);
	for (mapped = 0; mapped < n; mapped++) {
		struct page *p = sys[mapped] ? sys[mapped] : ZERO_PAGE(0);
		struct aperture_list_entry *e = &ad->list[mapped];

		addr[mapped] = dma_map_page(&ad->pdev->dev, p, 0, PAGE_SIZE, dir);
		if (dma_mapping_error(&ad->pdev->dev, addr[mapped])) {
			ret = -ENOMEM;
			break;
		}
		e->src = to_device ? addr[mapped] : apdrv_dev_offset(ad, dpages[mapped]);
		e->dst = to_device ? apdrv_dev_offset(ad, dpages[mapped]) : addr[mapped];
		e->length = PAGE_SIZE;
		e->flags = to_device ? APERTURE_DMA_DST_LOCAL : APERTURE_DMA_SRC_LOCAL;
		e->reserved = 0;
	}
	if (!ret) {
		dma_wmb();
		ret = apdrv_dma_list(ad, n);
	}
	for (i = 0; i < mapped; i++)
		dma_unmap_page(&ad->pdev->dev, addr[i], PAGE_SIZE, dir);
	if (!ret) {
		if (to_device) {
			ad->stats.pages_to_device += n;
			ad->stats.bytes_to_device += (u64)n * PAGE_SIZE;
		} else {
			ad->stats.pages_to_ram += n;
			ad->stats.bytes_to_ram += (u64)n * PAGE_SIZE;
		}
	}
	mutex_unlock(&ad->list_lock);
	return ret;
}

/* One step of a migration to the device: args->src collected by migrate_vma_setup. */
static unsigned long apdrv_migrate_chunk(struct apdrv *ad, struct migrate_vma *args, bool hidden,
					 struct apdrv_step *w)
{
	struct page **sys = w->sys, **dev = w->dev;
	unsigned long *dpages = w->dpages;
	unsigned int *idx = w->idx;
	unsigned long i, n = 0, moved = 0;

	for (i = 0; i < args->npages; i++) {
		struct page *spage = migrate_pfn_to_page(args->src[i]);

		args->dst[i] = 0;
		if (!(args->src[i] & MIGRATE_PFN_MIGRATE))
			continue;
		if (spage && is_zone_device_page(spage))
			continue;
		sys[n] = spage;
		idx[n++] = i;
	}
	n = apdrv_alloc_dpages(ad, hidden, n, dev);
	for (i = 0; i < n; i++) {
		zone_device_page_init(dev[i]);
		dpages[i] = apdrv_dpage(ad, dev[i]);
	}
	if (apdrv_copy(ad, sys, dpages, n, true)) {
		for (i = 0; i < n; i++) {
			unlock_page(dev[i]);
			put_page(dev[i]);
		}
		return 0;
	}
	for (i = 0; i < n; i++) {
		unsigned long s = args->src[idx[i]];

		args->dst[idx[i]] = migrate_pfn(page_to_pfn(dev[i]));
		if ((s & MIGRATE_PFN_WRITE) || (!sys[i] && (args->vma->vm_flags & VM_WRITE)))
			args->dst[idx[i]] |= MIGRATE_PFN_WRITE;
	}
	migrate_vma_pages(args);
	for (i = 0; i < n; i++)
		if (args->src[idx[i]] & MIGRATE_PFN_MIGRATE)
			moved++;
	return moved;
}

static int apdrv_migrate(struct apdrv *ad, struct aperture_migrate *m)
{
	struct mm_struct *mm = current->mm;
	unsigned long addr, next, end;
	struct apdrv_step *w;
	u64 *offsets = NULL;
	int ret = 0;

	if (m->reserved || (m->flags & ~APERTURE_MIGRATE_HIDDEN) || (m->addr & ~PAGE_MASK) ||
	    !m->npages || m->npages > APERTURE_MIGRATE_MAX_PAGES)
		return -EINVAL;
	end = m->addr + (m->npages << PAGE_SHIFT);
	if (end < m->addr)
		return -EINVAL;
	w = kvmalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	if (m->offsets) {
		offsets = kvmalloc_array(m->npages, sizeof(*offsets), GFP_KERNEL);
		if (!offsets) {
			kvfree(w);
			return -ENOMEM;
		}
		memset(offsets, 0xff, m->npages * sizeof(*offsets));
	}
	m->migrated = 0;
	mmap_read_lock(mm);
	for (addr = m->addr; addr < end; addr = next) {
		struct vm_area_struct *vma = vma_lookup(mm, addr);
		struct migrate_vma args = {
			.src = w->src,
			.dst = w->dst,
			.pgmap_owner = ad,
			.flags = MIGRATE_VMA_SELECT_SYSTEM,
		};
		unsigned long moved, i;

		if (!vma || !(vma->vm_flags & VM_READ)) {
			ret = -EINVAL;
			break;
		}
		next = min3(end, addr + APDRV_CHUNK * PAGE_SIZE, vma->vm_end);
		args.vma = vma;
		args.start = addr;
		args.end = next;
		ret = migrate_vma_setup(&args);
		if (ret)
			break;
		moved = apdrv_migrate_chunk(ad, &args, m->flags & APERTURE_MIGRATE_HIDDEN, w);
		if (offsets)
			for (i = 0; i < args.npages; i++) {
				struct page *p = migrate_pfn_to_page(args.dst[i]);

				if (p && (args.src[i] & MIGRATE_PFN_MIGRATE))
					offsets[(addr - m->addr) / PAGE_SIZE + i] =
						apdrv_dev_offset(ad, apdrv_dpage(ad, p));
			}
		migrate_vma_finalize(&args);
		m->migrated += moved;
	}
	mmap_read_unlock(mm);
	ad->stats.migrate_calls++;
	if (!ret && offsets && copy_to_user(u64_to_user_ptr(m->offsets), offsets,
					    m->npages * sizeof(*offsets)))
		ret = -EFAULT;
	kvfree(offsets);
	kvfree(w);
	return ret;
}

/* A CPU touched a device page: bring it back by device DMA. */
static vm_fault_t apdrv_migrate_to_ram(struct vm_fault *vmf)
{
	struct apdrv *ad = apdrv_of_page(vmf->page);
	unsigned long src = 0, dst = 0, dpage_index;
	struct migrate_vma args = {
		.vma = vmf->vma,
		.start = vmf->address & PAGE_MASK,
		.end = (vmf->address & PAGE_MASK) + PAGE_SIZE,
		.src = &src,
		.dst = &dst,
		.pgmap_owner = ad,
		.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
		.fault_page = vmf->page,
	};
	struct page *spage, *dpage;

	atomic64_inc(&ad->faults);
	if (migrate_vma_setup(&args))
		return VM_FAULT_SIGBUS;
	spage = migrate_pfn_to_page(src);
	if ((src & MIGRATE_PFN_MIGRATE) && spage) {
		dpage = alloc_page_vma(GFP_HIGHUSER_MOVABLE, vmf->vma, vmf->address);
		if (!dpage) {
			migrate_vma_finalize(&args);
			return VM_FAULT_OOM;
		}
		lock_page(dpage);
		dpage_index = apdrv_dpage(ad, spage);
		if (apdrv_copy(ad, &dpage, &dpage_index, 1, false)) {
			unlock_page(dpage);
			__free_page(dpage);
			migrate_vma_finalize(&args);
			return VM_FAULT_SIGBUS;
		}
		dst = migrate_pfn(page_to_pfn(dpage));
		if (src & MIGRATE_PFN_WRITE)
			dst |= MIGRATE_PFN_WRITE;
	}
	migrate_vma_pages(&args);
	migrate_vma_finalize(&args);
	return 0;
}

static const struct dev_pagemap_ops apdrv_pgmap_ops = {
	.page_free = apdrv_page_free,
	.migrate_to_ram = apdrv_migrate_to_ram,
};

/* Bring every device page back to system memory (unbind): device DMA, in chunks. */
static void apdrv_evict_all(struct apdrv *ad)
{
	struct apdrv_step *w = kvmalloc(sizeof(*w), GFP_KERNEL | __GFP_NOFAIL);
	unsigned long *src = w->src, *dst = w->dst, *dpages = w->dpages;
	struct page **sys = w->sys;
	unsigned long start, i, n, k;

	for (start = 0; start < ad->npages; start += n) {
		n = min_t(unsigned long, APDRV_CHUNK, ad->npages - start);
		if (find_next_bit(ad->used, start + n, start) >= start + n)
			continue;
		memset(src, 0, sizeof(w->src));
		memset(dst, 0, sizeof(w->dst));
		migrate_device_range(src, ad->pfn_first + start, n);
		for (i = 0, k = 0; i < n; i++) {
			struct page *spage = migrate_pfn_to_page(src[i]);
			struct page *dpage;

			if (!spage || !(src[i] & MIGRATE_PFN_MIGRATE))
				continue;
			dpage = alloc_page(GFP_HIGHUSER_MOVABLE | __GFP_NOFAIL | __GFP_ZERO);
			lock_page(dpage);
			sys[k] = dpage;
			dpages[k++] = apdrv_dpage(ad, spage);
			dst[i] = migrate_pfn(page_to_pfn(dpage));
			if (src[i] & MIGRATE_PFN_WRITE)
				dst[i] |= MIGRATE_PFN_WRITE;
		}
		if (k && apdrv_copy(ad, sys, dpages, k, false))
			dev_warn(&ad->pdev->dev,
				 "device did not copy %lu pages back: they read as zero\n", k);
		ad->stats.evicted_at_unbind += k;
		migrate_device_pages(src, dst, n);
		migrate_device_finalize(src, dst, n);
	}
	kvfree(w);
}

/* ------------------------------------------------------------------ peer mappings */

/* No peer holds the device page any more: free it now if it was freed meanwhile. */
static void apdrv_release_dpage(struct apdrv *ad, unsigned long dpage)
{
	spin_lock(&ad->alloc_lock);
	__clear_bit(dpage, ad->peer_held);
	if (__test_and_clear_bit(dpage, ad->zombie)) {
		__clear_bit(dpage, ad->used);
		ad->stats.device_pages--;
	}
	spin_unlock(&ad->alloc_lock);
}

struct apdrv_lookup {
	struct mmu_interval_notifier notifier;
	struct apdrv *ad;
};

static bool apdrv_lookup_invalidate(struct mmu_interval_notifier *mni,
				    const struct mmu_notifier_range *range,
				    unsigned long cur_seq)
{
	struct apdrv_lookup *l = container_of(mni, struct apdrv_lookup, notifier);

	if (mmu_notifier_range_blockable(range))
		mutex_lock(&l->ad->notifier_lock);
	else if (!mutex_trylock(&l->ad->notifier_lock))
		return false;
	mmu_interval_set_seq(mni, cur_seq);
	mutex_unlock(&l->ad->notifier_lock);
	return true;
}

static const struct mmu_interval_notifier_ops apdrv_lookup_ops = {
	.invalidate = apdrv_lookup_invalidate,
};

static struct apdrv_peer *apdrv_peer_find(struct apdrv *ad, struct file *owner, u64 id)
{
	int i;

	for (i = 0; i < APDRV_MAX_PEERS; i++)
		if (ad->peers[i].id && ad->peers[i].id == id &&
		    (!owner || ad->peers[i].owner == owner))
			return &ad->peers[i];
	return NULL;
}

/*
 * Find the device page behind addr without faulting it back (hmm_range_fault
 * with this device as owner), then mark it held by a peer and give it a pinned
 * slot.
 */
static int apdrv_peer_map(struct apdrv *ad, struct file *file, struct aperture_peer_map *pm)
{
	struct mm_struct *mm = current->mm;
	struct apdrv_lookup l = { .ad = ad };
	unsigned long hpfn = 0, dpage;
	struct hmm_range range = {
		.notifier = &l.notifier,
		.start = pm->addr,
		.end = pm->addr + PAGE_SIZE,
		.hmm_pfns = &hpfn,
		.default_flags = HMM_PFN_REQ_FAULT,
		.dev_private_owner = ad,
	};
	struct apdrv_peer *peer = NULL;
	struct page *page;
	u64 off, ap;
	u32 slot;
	void *kaddr;
	int ret, i;

	if ((pm->addr & ~PAGE_MASK) || pm->reserved)
		return -EINVAL;
	ret = mmu_interval_notifier_insert(&l.notifier, mm, pm->addr, PAGE_SIZE, &apdrv_lookup_ops);
	if (ret)
		return ret;
	for (;;) {
		range.notifier_seq = mmu_interval_read_begin(&l.notifier);
		mmap_read_lock(mm);
		ret = hmm_range_fault(&range);
		mmap_read_unlock(mm);
		if (ret == -EBUSY)
			continue;
		if (ret)
			goto out_remove;
		mutex_lock(&ad->slot_lock);
		mutex_lock(&ad->notifier_lock);
		if (!mmu_interval_read_retry(&l.notifier, range.notifier_seq))
			break;
		mutex_unlock(&ad->notifier_lock);
		mutex_unlock(&ad->slot_lock);
	}
	/*
	 * With notifier_lock held the page cannot leave the device: mark it
	 * held by a peer first, so that a migration back to RAM after we let go
	 * does not free the device page under the peer.
	 */
	page = (hpfn & HMM_PFN_VALID) ? hmm_pfn_to_page(hpfn) : NULL;
	if (!page || !is_device_private_page(page) || page->pgmap != &ad->pgmap) {
		ret = -ENXIO;	/* not in this device's memory: migrate it first */
		goto out_unlock;
	}
	dpage = apdrv_dpage(ad, page);
	if (test_bit(dpage, ad->hidden_map)) {
		ret = -EACCES;	/* never exposable, whatever the caller wants */
		goto out_unlock;
	}
	for (i = 0; i < APDRV_MAX_PEERS; i++) {
		if (ad->peers[i].id && ad->peers[i].dpage == dpage) {
			ret = -EEXIST;
			goto out_unlock;
		}
		if (!ad->peers[i].id && !peer)
			peer = &ad->peers[i];
	}
	if (!peer) {
		ret = -ENOSPC;
		goto out_unlock;
	}
	spin_lock(&ad->alloc_lock);
	__set_bit(dpage, ad->peer_held);
	spin_unlock(&ad->alloc_lock);
	mutex_unlock(&ad->notifier_lock);

	off = apdrv_dev_offset(ad, dpage);
	ap = div64_u64(off, ad->slot_size);
	ret = apdrv_get_slot(ad, ap, &slot);
	if (ret) {
		apdrv_release_dpage(ad, dpage);
		mutex_unlock(&ad->slot_lock);
		goto out_remove;
	}
	kaddr = ad->p2p_base + slot * ad->slot_size + (off - ap * ad->slot_size);
	peer->id = ++ad->next_peer_id;
	peer->owner = file;
	peer->dpage = dpage;
	peer->slot = slot;
	peer->p2p = virt_to_page(kaddr);
	ad->stats.peer_maps++;
	pm->id = peer->id;
	pm->bus_addr = pci_p2pmem_virt_to_bus(ad->win, kaddr);
	pm->dev_offset = off;
	pm->slot = slot;
	mutex_unlock(&ad->slot_lock);
	goto out_remove;

out_unlock:
	mutex_unlock(&ad->notifier_lock);
	mutex_unlock(&ad->slot_lock);
out_remove:
	mmu_interval_notifier_remove(&l.notifier);
	return ret;
}

/*
 * Release a peer mapping: zap userspace mappings of its P2P page, then wait
 * until no one else holds the page (an O_DIRECT in flight pins it) before the
 * slot is unpinned; -EBUSY if it stays held.
 */
static int apdrv_peer_unmap(struct apdrv *ad, struct file *file, u64 id)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(APDRV_UNMAP_WAIT_MS);
	struct apdrv_peer *peer;
	int ret = 0;

	mutex_lock(&ad->slot_lock);
	peer = apdrv_peer_find(ad, file, id);
	if (!peer) {
		mutex_unlock(&ad->slot_lock);
		return -ENOENT;
	}
	if (file)
		unmap_mapping_range(file->f_mapping, (loff_t)id << PAGE_SHIFT, PAGE_SIZE, 1);
	while (page_ref_count(peer->p2p) > 1) {
		if (time_after(jiffies, deadline)) {
			ret = -EBUSY;
			goto out;
		}
		mutex_unlock(&ad->slot_lock);
		usleep_range(100, 1000);
		mutex_lock(&ad->slot_lock);
	}
	apdrv_unpin(ad, peer->slot);
	apdrv_release_dpage(ad, peer->dpage);
	peer->id = 0;
	ad->stats.peer_unmaps++;
out:
	mutex_unlock(&ad->slot_lock);
	return ret;
}

/* ------------------------------------------------------------------ the character device */

static struct apdrv *apdrv_of_file(struct file *file)
{
	return file->private_data;
}

static void apdrv_free(struct kref *ref)
{
	kfree(container_of(ref, struct apdrv, ref));
}

/* Called by misc_open with misc_mtx held: the device cannot be unregistered under us. */
static int apdrv_open(struct inode *inode, struct file *file)
{
	struct apdrv *ad = container_of(file->private_data, struct apdrv, misc);

	kref_get(&ad->ref);
	file->private_data = ad;
	return 0;
}

static int apdrv_release(struct inode *inode, struct file *file)
{
	struct apdrv *ad = apdrv_of_file(file);
	int i;

	down_read(&ad->gone_lock);
	for (i = 0; !ad->gone && i < APDRV_MAX_PEERS; i++)
		if (ad->peers[i].id && ad->peers[i].owner == file)
			if (apdrv_peer_unmap(ad, file, ad->peers[i].id))
				dev_warn(&ad->pdev->dev,
					 "slot %u stays pinned: its P2P page is still held\n",
					 ad->peers[i].slot);
	up_read(&ad->gone_lock);
	kref_put(&ad->ref, apdrv_free);
	return 0;
}

static int apdrv_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct apdrv *ad = apdrv_of_file(file);
	struct apdrv_peer *peer;
	int ret;

	if (!(vma->vm_flags & VM_SHARED) || vma->vm_end - vma->vm_start != PAGE_SIZE)
		return -EINVAL;
	/*
	 * mmap runs under mmap_lock, and the ioctls take mmap_lock (a
	 * migration, a fault on their arguments) under gone_lock: taking
	 * gone_lock here would be the other order. slot_lock nests inside
	 * mmap_lock everywhere, and unbind sets ->gone under it too.
	 */
	mutex_lock(&ad->slot_lock);
	if (ad->gone) {
		ret = -ENODEV;
	} else {
		peer = apdrv_peer_find(ad, file, vma->vm_pgoff);
		ret = peer ? vm_insert_page(vma, vma->vm_start, peer->p2p) : -ENOENT;
	}
	mutex_unlock(&ad->slot_lock);
	return ret;
}

static long apdrv_ioctl_locked(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct apdrv *ad = apdrv_of_file(file);
	void __user *uarg = (void __user *)arg;
	int ret;

	switch (cmd) {
	case APERTURE_IOC_MIGRATE: {
		struct aperture_migrate m;

		if (copy_from_user(&m, uarg, sizeof(m)))
			return -EFAULT;
		ret = apdrv_migrate(ad, &m);
		if (!ret && copy_to_user(uarg, &m, sizeof(m)))
			ret = -EFAULT;
		return ret;
	}
	case APERTURE_IOC_PEER_MAP: {
		struct aperture_peer_map pm;

		if (copy_from_user(&pm, uarg, sizeof(pm)))
			return -EFAULT;
		ret = apdrv_peer_map(ad, file, &pm);
		if (!ret && copy_to_user(uarg, &pm, sizeof(pm))) {
			apdrv_peer_unmap(ad, file, pm.id);
			ret = -EFAULT;
		}
		return ret;
	}
	case APERTURE_IOC_PEER_UNMAP: {
		u64 id;

		if (copy_from_user(&id, uarg, sizeof(id)))
			return -EFAULT;
		return apdrv_peer_unmap(ad, file, id);
	}
	case APERTURE_IOC_STATS: {
		struct aperture_stats s;

		mutex_lock(&ad->slot_lock);
		s = ad->stats;
		mutex_unlock(&ad->slot_lock);
		s.faults = atomic64_read(&ad->faults);
		return copy_to_user(uarg, &s, sizeof(s)) ? -EFAULT : 0;
	}
	case APERTURE_IOC_INFO: {
		struct aperture_info info = {
			.index = ad->index,
			.nr_slots = ad->nr_slots,
			.devmem = ad->devmem,
			.window = ad->window,
			.slot_size = ad->slot_size,
			.window_bus = pci_bus_address(ad->win, 2),
			.p2p_pages = ad->window >> PAGE_SHIFT,
		};

		return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
	}
	default:
		return -ENOTTY;
	}
}

static long apdrv_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct apdrv *ad = apdrv_of_file(file);
	long ret = -ENODEV;

	down_read(&ad->gone_lock);
	if (!ad->gone)
		ret = apdrv_ioctl_locked(file, cmd, arg);
	up_read(&ad->gone_lock);
	return ret;
}

static const struct file_operations apdrv_fops = {
	.owner = THIS_MODULE,
	.open = apdrv_open,
	.release = apdrv_release,
	.mmap = apdrv_mmap,
	.unlocked_ioctl = apdrv_ioctl,
	.llseek = noop_llseek,
};

/* ------------------------------------------------------------------ probe and remove */

static int apdrv_read_config(struct apdrv *ad)
{
	u32 version, i;

	if (readl(ad->ctl + APERTURE_REG_MAGIC) != APERTURE_MAGIC)
		return -ENODEV;
	version = readl(ad->ctl + APERTURE_REG_ABI_VERSION);
	if (version >> 16 != APERTURE_ABI_MAJOR || (version & 0xffff) < 3) {
		pci_err(ad->pdev, "device ABI %u.%u: this driver needs %u.3 or later\n",
			version >> 16, version & 0xffff, APERTURE_ABI_MAJOR);
		return -ENODEV;
	}
	ad->index = readl(ad->ctl + APERTURE_REG_DEVICE_INDEX);
	ad->devmem = readq(ad->ctl + APERTURE_REG_DEVMEM_SIZE);
	ad->window = readq(ad->ctl + APERTURE_REG_WINDOW_SIZE);
	ad->slot_size = readq(ad->ctl + APERTURE_REG_SLOT_SIZE);
	ad->nr_slots = readl(ad->ctl + APERTURE_REG_NR_SLOTS);
	ad->nr_hidden = readl(ad->ctl + APERTURE_REG_NR_HIDDEN);
	ad->doorbell = readl(ad->ctl + APERTURE_REG_DOORBELL_PEER) << 16;
	if (!ad->devmem || ad->devmem % PAGE_SIZE || !ad->slot_size || ad->slot_size % PAGE_SIZE ||
	    !ad->nr_slots || ad->nr_slots > APERTURE_MAX_SLOTS ||
	    ad->nr_hidden > APERTURE_MAX_HIDDEN ||
	    ad->window != ad->nr_slots * ad->slot_size || ad->index >= APERTURE_MAX_DEVICES)
		return -EINVAL;
	for (i = 0; i < ad->nr_hidden; i++) {
		ad->hidden[i][0] = readq(ad->ctl + APERTURE_REG_HIDDEN + 16 * i);
		ad->hidden[i][1] = readq(ad->ctl + APERTURE_REG_HIDDEN + 16 * i + 8);
		if (ad->hidden[i][0] > ad->hidden[i][1] || ad->hidden[i][1] > ad->devmem)
			return -EINVAL;
	}
	return 0;
}

/*
 * The window device: on bus 0 at WINDOW_PCI_SLOT, an ivshmem-plain whose BAR2
 * is exactly the window.
 */
static int apdrv_find_window(struct apdrv *ad)
{
	u32 slot = readl(ad->ctl + APERTURE_REG_WINDOW_PCI_SLOT);

	ad->win = pci_get_domain_bus_and_slot(pci_domain_nr(ad->pdev->bus), 0, PCI_DEVFN(slot, 0));
	if (!ad->win)
		return -ENODEV;
	if (ad->win->hdr_type != PCI_HEADER_TYPE_NORMAL ||
	    pci_resource_len(ad->win, 2) != ad->window) {
		pci_err(ad->pdev,
			"window at slot %#x is not a plain window BAR (hotplug topology?)\n",
			slot);
		pci_dev_put(ad->win);
		ad->win = NULL;
		return -ENODEV;
	}
	return 0;
}

static int apdrv_setup_window(struct apdrv *ad)
{
	int ret;

	/*
	 * The registration outlives an unbind (it belongs to the window
	 * device): reuse it on a rebind.
	 */
	if (!pci_has_p2pmem(ad->win)) {
		ret = pci_p2pdma_add_resource(ad->win, 2, 0, 0);
		if (ret)
			return ret;
	}
	pci_p2pmem_publish(ad->win, true);
	ad->p2p_base = pci_alloc_p2pmem(ad->win, ad->window);
	if (!ad->p2p_base) {
		pci_err(ad->pdev, "the window's P2P memory is in use by someone else\n");
		return -EBUSY;
	}
	return 0;
}

static int apdrv_setup_devmem(struct apdrv *ad)
{
	void *addr;
	u32 i;

	ad->npages = ad->devmem >> PAGE_SHIFT;
	ad->used = bitmap_zalloc(ad->npages, GFP_KERNEL);
	ad->hidden_map = bitmap_zalloc(ad->npages, GFP_KERNEL);
	ad->peer_held = bitmap_zalloc(ad->npages, GFP_KERNEL);
	ad->zombie = bitmap_zalloc(ad->npages, GFP_KERNEL);
	if (!ad->used || !ad->hidden_map || !ad->peer_held || !ad->zombie)
		return -ENOMEM;
	for (i = 0; i < ad->nr_hidden; i++)
		bitmap_set(ad->hidden_map, ad->hidden[i][0] >> PAGE_SHIFT,
			   (ad->hidden[i][1] - ad->hidden[i][0]) >> PAGE_SHIFT);
	ad->res = request_free_mem_region(&iomem_resource, ad->devmem, ad->name);
	if (IS_ERR(ad->res))
		return PTR_ERR(ad->res);
	ad->pgmap.type = MEMORY_DEVICE_PRIVATE;
	ad->pgmap.range.start = ad->res->start;
	ad->pgmap.range.end = ad->res->end;
	ad->pgmap.nr_range = 1;
	ad->pgmap.ops = &apdrv_pgmap_ops;
	ad->pgmap.owner = ad;
	addr = memremap_pages(&ad->pgmap, dev_to_node(&ad->pdev->dev));
	if (IS_ERR(addr)) {
		release_mem_region(ad->res->start, resource_size(ad->res));
		ad->res = NULL;
		return PTR_ERR(addr);
	}
	ad->pfn_first = ad->res->start >> PAGE_SHIFT;
	ad->cursor = ad->npages - 1;
	ad->hidden_cursor = ad->npages - 1;
	return 0;
}

static void apdrv_teardown(struct apdrv *ad)
{
	u32 k;

	if (ad->res) {
		apdrv_evict_all(ad);
		memunmap_pages(&ad->pgmap);
		release_mem_region(ad->res->start, resource_size(ad->res));
	}
	if (ad->ctl)
		for (k = 0; k < APERTURE_MAX_SLOTS; k++)
			writel(0, ad->ctl + APERTURE_REG_SLOT_PIN + 4 * k);
	if (ad->p2p_base)
		pci_free_p2pmem(ad->win, ad->p2p_base, ad->window);
	if (ad->win)
		pci_dev_put(ad->win);
	if (ad->list)
		dma_free_coherent(&ad->pdev->dev, APDRV_CHUNK * sizeof(*ad->list),
				  ad->list, ad->list_dma);
	bitmap_free(ad->used);
	bitmap_free(ad->hidden_map);
	bitmap_free(ad->peer_held);
	bitmap_free(ad->zombie);
	if (ad->ctl)
		pci_iounmap(ad->pdev, ad->ctl);
	if (ad->regs)
		pci_iounmap(ad->pdev, ad->regs);
}

static int apdrv_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct apdrv *ad;
	int ret;

	ad = kzalloc(sizeof(*ad), GFP_KERNEL);
	if (!ad)
		return -ENOMEM;
	ad->pdev = pdev;
	mutex_init(&ad->ring_lock);
	mutex_init(&ad->list_lock);
	mutex_init(&ad->slot_lock);
	mutex_init(&ad->notifier_lock);
	kref_init(&ad->ref);
	init_rwsem(&ad->gone_lock);
	spin_lock_init(&ad->alloc_lock);
	atomic64_set(&ad->faults, 0);
	ret = pci_enable_device_mem(pdev);
	if (ret)
		goto err_free;
	pci_set_master(pdev);
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto err_disable;
	ad->regs = pci_iomap(pdev, 0, 0);
	ad->ctl = pci_iomap(pdev, 2, 0);
	if (!ad->regs || !ad->ctl || pci_resource_len(pdev, 2) < APERTURE_CTL_SIZE) {
		ret = -ENODEV;
		goto err_teardown;
	}
	ret = apdrv_read_config(ad);
	if (ret)
		goto err_teardown;
	snprintf(ad->name, sizeof(ad->name), APDRV_NAME "%u", ad->index);
	ret = apdrv_find_window(ad);
	if (ret)
		goto err_teardown;
	ad->list = dma_alloc_coherent(&pdev->dev, APDRV_CHUNK * sizeof(*ad->list),
				      &ad->list_dma, GFP_KERNEL);
	if (!ad->list) {
		ret = -ENOMEM;
		goto err_teardown;
	}
	ret = apdrv_setup_window(ad);
	if (ret)
		goto err_teardown;
	ret = apdrv_setup_devmem(ad);
	if (ret)
		goto err_teardown;
	apdrv_resync(ad);
	ad->misc.minor = MISC_DYNAMIC_MINOR;
	ad->misc.name = ad->name;
	ad->misc.fops = &apdrv_fops;
	ad->misc.parent = &pdev->dev;
	ret = misc_register(&ad->misc);
	if (ret)
		goto err_teardown;
	pci_set_drvdata(pdev, ad);
	pci_info(pdev,
		 "device %u: %llu MiB device-private memory, %u slots of %llu KiB in window %s\n",
		 ad->index, ad->devmem >> 20, ad->nr_slots, ad->slot_size >> 10, pci_name(ad->win));
	return 0;

err_teardown:
	apdrv_teardown(ad);
err_disable:
	pci_disable_device(pdev);
err_free:
	kref_put(&ad->ref, apdrv_free);
	return ret;
}

/*
 * Unbind: no new opens; files still open keep the structure (kref) and get
 * -ENODEV from now on (rmmod cannot get here with files open: they hold the
 * module); peer mappings end, then every device page comes back to system
 * memory.
 */
static void apdrv_remove(struct pci_dev *pdev)
{
	struct apdrv *ad = pci_get_drvdata(pdev);
	struct apdrv_peer *peer;
	int i;

	misc_deregister(&ad->misc);
	down_write(&ad->gone_lock);
	mutex_lock(&ad->slot_lock);	/* mmap reads ->gone under slot_lock only */
	ad->gone = true;
	mutex_unlock(&ad->slot_lock);
	for (i = 0; i < APDRV_MAX_PEERS; i++) {
		peer = &ad->peers[i];
		if (!peer->id)
			continue;
		if (apdrv_peer_unmap(ad, peer->owner, peer->id))
			dev_warn(&pdev->dev, "unbind: a peer still holds the P2P page of slot %u\n",
				 peer->slot);
	}
	up_write(&ad->gone_lock);
	apdrv_teardown(ad);
	pci_disable_device(pdev);
	kref_put(&ad->ref, apdrv_free);
}

/* Nothing matches by ID: a device is bound only through driver_override ("aperture"). */
static const struct pci_device_id apdrv_ids[] = {
	{ }
};
MODULE_DEVICE_TABLE(pci, apdrv_ids);

static struct pci_driver apdrv_driver = {
	.name = APDRV_NAME,
	.id_table = apdrv_ids,
	.probe = apdrv_probe,
	.remove = apdrv_remove,
};
module_pci_driver(apdrv_driver);

MODULE_DESCRIPTION("aperture devices: device-private memory, a P2PDMA window, peer mappings");
MODULE_LICENSE("GPL");
