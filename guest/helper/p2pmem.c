/* The kernel's own peer-to-peer memory: an NVMe controller memory buffer (CMB) that a kernel with
 * CONFIG_PCI_P2PDMA publishes as p2pmem. Its pages are ZONE_DEVICE pages, so O_DIRECT into a mapping of
 * them works where it fails into a raw BAR mapping (the probe matrix's "bar" row).
 *   zone_device.p2pmem  O_DIRECT from the NVMe namespace into p2pmem; its physical address, for the host
 *                       to check against QMP's BARs of the NVMe controller
 *   p2p.nvme_cmb        namespace <-> CMB through the kernel's P2P path (O_DIRECT both ways); the host finds
 *                       the pattern in the namespace's backing file
 * The guest reports what happened; the host decides against the kernel's config (absent without P2PDMA). */
#define _GNU_SOURCE
#include "checks.h"
#include "report.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define KIB 1024ULL
#define MIB (1024ULL * KIB)
#define PCI_DEVICES "/sys/bus/pci/devices"

/* Offset and length of the p2p.nvme_cmb transfer in the namespace (the host reads the same place). */
#define NVME_CMB_OFFSET (1 * MIB)
#define NVME_CMB_LEN (1 * MIB)

struct p2p_provider {
    char pci[64];       /* 0000:00:04.0 */
    char blockdev[80];  /* /dev/nvme0n1, when the provider is an NVMe controller with a namespace */
    unsigned long long size;
};

/* An NVMe controller that publishes p2pmem (an aperture window the driver registered is not this row's). */
static int has_p2pmem(const char *dir, const char *name)
{
    char path[512], nvme[512];

    snprintf(path, sizeof(path), "%s/%s/p2pmem/allocate", dir, name);
    snprintf(nvme, sizeof(nvme), "%s/%s/nvme", dir, name);
    return path_exists(path) && path_exists(nvme);
}

static int is_namespace(const char *dir, const char *name)
{
    (void)dir;
    return strchr(name, 'n') != strrchr(name, 'n'); /* nvme0n1, not nvme0 */
}

/* The first p2pmem provider, and its namespace's block device if it is an NVMe controller. */
static int find_provider(struct p2p_provider *p)
{
    char path[512], text[64], ctrl[64], ns[64];

    memset(p, 0, sizeof(*p));
    if (!find_entry(PCI_DEVICES, "0000:", p->pci, sizeof(p->pci), has_p2pmem))
        return -1;
    snprintf(path, sizeof(path), PCI_DEVICES "/%s/p2pmem/size", p->pci);
    if (read_text(path, text, sizeof(text)) == 0)
        p->size = strtoull(text, NULL, 0);
    snprintf(path, sizeof(path), PCI_DEVICES "/%s/nvme", p->pci);
    if (find_entry(path, "nvme", ctrl, sizeof(ctrl), NULL)) {
        snprintf(path, sizeof(path), PCI_DEVICES "/%s/nvme/%s", p->pci, ctrl);
        if (find_entry(path, ctrl, ns, sizeof(ns), is_namespace))
            snprintf(p->blockdev, sizeof(p->blockdev), "/dev/%s", ns);
    }
    return 0;
}

/* len bytes of p2pmem, allocated by mapping the provider's p2pmem/allocate file (freed by munmap). */
static void *p2pmem_alloc(const struct p2p_provider *p, size_t len)
{
    char path[512];
    void *m;
    int fd;

    snprintf(path, sizeof(path), PCI_DEVICES "/%s/p2pmem/allocate", p->pci);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static void absent(struct jbuf *jb, const char *why)
{
    jb_printf(jb, "\"result\":\"absent\",\"why\":");
    jb_str(jb, why);
}

int p2pmem_probe_row(struct jbuf *jb)
{
    struct p2p_provider p;
    void *m;
    int fd;
    ssize_t n;

    jb_printf(jb, "{\"memory\":\"p2pmem\",");
    if (find_provider(&p) != 0) {
        absent(jb, "no " PCI_DEVICES "/*/p2pmem: kernel without CONFIG_PCI_P2PDMA or no provider");
        jb_printf(jb, "}");
        return 0;
    }
    jb_printf(jb, "\"pci\":");
    jb_str(jb, p.pci);
    jb_printf(jb, ",\"p2pmem_size\":%llu,\"source\":", p.size);
    jb_str(jb, p.blockdev);
    if (!p.blockdev[0]) {
        jb_printf(jb, ",");
        absent(jb, "the p2pmem provider has no NVMe namespace to read from");
        jb_printf(jb, "}");
        return 0;
    }
    /* The source must be a queue that takes P2P pages (an NVMe namespace does; pmem does not). */
    fd = open(p.blockdev, O_RDONLY | O_DIRECT | O_CLOEXEC);
    m = p2pmem_alloc(&p, 4096);
    if (fd < 0 || !m) {
        jb_printf(jb, ",\"result\":\"%s\",\"phys\":0}", errno_name(errno));
        if (fd >= 0)
            close(fd);
        return 0;
    }
    n = pread(fd, m, 4096, 0);
    jb_printf(jb, ",\"result\":\"%s\",\"phys\":%llu}",
              n == 4096 ? "ok" : n < 0 ? errno_name(errno) : "short", virt_to_phys(m));
    munmap(m, 4096);
    close(fd);
    return n == 4096;
}

static void check_p2pmem_row(void)
{
    struct jbuf jb;

    jb_init(&jb);
    /* ok is decided by the host (kernel config + QMP); the guest says whether the read worked */
    report_check(APERTURE_CHECK_ZONE_DEVICE_P2PMEM, p2pmem_probe_row(&jb), jb.buf);
}

static uint32_t token_seed(void)
{
    const char *token = env_or(APERTURE_ENV_STAMP, "1");

    return (uint32_t)(strtoul(token, NULL, 16) & 0xffff) | 1;
}

static void check_nvme_cmb(void)
{
    struct p2p_provider p;
    struct jbuf jb;
    const size_t len = NVME_CMB_LEN;
    uint32_t seed = token_seed();
    uint8_t *src = NULL, *dst = NULL;
    const char *wr = "not attempted", *rd = "not attempted";
    int fd = -1, back_ok = 0;
    ssize_t n;

    jb_init(&jb);
    jb_printf(&jb, "{");
    if (find_provider(&p) != 0 || !p.blockdev[0]) {
        absent(&jb, p.pci[0] ? "the p2pmem provider has no NVMe namespace"
                             : "no p2pmem provider: kernel without CONFIG_PCI_P2PDMA, or no NVMe controller "
                               "with a CMB");
        jb_printf(&jb, "}");
        report_check(APERTURE_CHECK_P2P_NVME_CMB, 0, jb.buf);
        return;
    }
    src = p2pmem_alloc(&p, len);
    dst = p2pmem_alloc(&p, len);
    fd = open(p.blockdev, O_RDWR | O_DIRECT | O_CLOEXEC);
    if (src && dst && fd >= 0) {
        pattern_fill(src, len, seed);     /* CPU stores into the CMB */
        n = pwrite(fd, src, len, NVME_CMB_OFFSET);  /* the controller reads its own CMB */
        wr = n == (ssize_t)len ? "ok" : n < 0 ? errno_name(errno) : "short";
        if (n == (ssize_t)len && fsync(fd) != 0)
            wr = errno_name(errno);
        memset(dst, 0, len);
        n = pread(fd, dst, len, NVME_CMB_OFFSET);   /* the controller writes into its CMB */
        rd = n == (ssize_t)len ? "ok" : n < 0 ? errno_name(errno) : "short";
        back_ok = n == (ssize_t)len && pattern_check(dst, len, seed);
    }
    jb_printf(&jb, "\"pci\":");
    jb_str(&jb, p.pci);
    jb_printf(&jb, ",\"device\":");
    jb_str(&jb, p.blockdev);
    jb_printf(&jb, ",\"open\":\"%s\",\"alloc\":\"%s\",\"offset\":%llu,\"len\":%zu,\"seed\":%u,"
              "\"write\":\"%s\",\"read\":\"%s\",\"read_back_ok\":%s,\"src_phys\":%llu,\"dst_phys\":%llu}",
              fd >= 0 ? "ok" : errno_name(errno), src && dst ? "ok" : "failed", NVME_CMB_OFFSET, len, seed,
              wr, rd, back_ok ? "true" : "false", src ? virt_to_phys(src) : 0ULL,
              dst ? virt_to_phys(dst) : 0ULL);
    report_check(APERTURE_CHECK_P2P_NVME_CMB, back_ok && strcmp(wr, "ok") == 0, jb.buf);
    if (fd >= 0)
        close(fd);
    if (src)
        munmap(src, len);
    if (dst)
        munmap(dst, len);
}

TEST(check_zone_device_p2pmem, .name = APERTURE_CHECK_ZONE_DEVICE_P2PMEM, .fn = check_p2pmem_row, .order = 300,
     .tags = TAG_DEFAULT);
TEST(check_p2p_nvme_cmb, .name = APERTURE_CHECK_P2P_NVME_CMB, .fn = check_nvme_cmb, .order = 310, .tags = TAG_DEFAULT);
