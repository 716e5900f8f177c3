/* DAX and ZONE_DEVICE: put NVDIMM regions into fsdax/devdax through sysfs only (fixture dax_configured), mount
 * and map them (fixture dax), and check MAP_SYNC, persistence and the struct-page probe matrix (O_DIRECT into
 * RAM, DAX mappings and a PCI BAR mapping).
 *
 * Checks: dax.persistence (when $aperture_expect is set), dax.fsdax, dax.map_sync, dax.devdax, zone_device.probe.
 */
#define _GNU_SOURCE
#include "checks.h"
#include "harness.h"
#include "report.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif
#ifndef STATX_ATTR_DAX
#define STATX_ATTR_DAX 0x00200000
#endif

#define ND "/sys/bus/nd/devices"
#define MIB (1024ULL * 1024ULL)
#define STAMP_LEN 4096
#define DEVDAX_STAMP_OFF (2 * MIB)
#define MAPSYNC_LEN (2 * MIB)
#define FSDAX_DIR "/mnt/fsdax"

struct pmem {
    struct region r;
    int region_id;
    char want[16];      /* fsdax | devdax */
    char ns[64];        /* namespaceN.M */
    char claim[64];     /* pfnN.M | daxN.M after configuration */
    char dev[96];       /* /dev/pmemN or /dev/daxN.M */
    unsigned long long data_phys;
    char action[32];    /* reused | configured | reconfigured */
    char error[1024];
};

/* namespaceN.M, not the region's namespace_seed attribute */
static int is_namespace_dev(const char *dir, const char *name)
{
    (void)dir;
    return name[9] >= '0' && name[9] <= '9';
}

/* A pfn/dax/btt device that claims a namespace and has a driver bound. */
static int claims_namespace(const char *dir, const char *name)
{
    char path[512], buf[128];
    snprintf(path, sizeof(path), "%s/%s/namespace", dir, name);
    if (read_text(path, buf, sizeof(buf)) != 0 || !buf[0])
        return 0;
    snprintf(path, sizeof(path), "%s/%s/driver", dir, name);
    return path_exists(path);
}

static const char *mode_of_claim(const char *claim)
{
    if (!strncmp(claim, "pfn", 3))
        return "fsdax";
    if (!strncmp(claim, "dax", 3))
        return "devdax";
    if (!strncmp(claim, "btt", 3))
        return "sector";
    return "raw";
}

static int current_claim(struct pmem *p, char *out, size_t outlen)
{
    char dir[512];
    snprintf(dir, sizeof(dir), ND "/%s", p->r.name);
    return find_entry(dir, "pfn", out, outlen, claims_namespace) ||
           find_entry(dir, "dax", out, outlen, claims_namespace) ||
           find_entry(dir, "btt", out, outlen, claims_namespace);
}

static int wait_for(const char *path)
{
    for (int i = 0; i < 300 && !path_exists(path); i++)
        usleep(10000);
    return path_exists(path);
}

static int raw_blockdev(struct pmem *p, char *out, size_t outlen)
{
    char dir[512], name[64], drv[512];
    snprintf(drv, sizeof(drv), ND "/%s/driver", p->ns);
    if (!path_exists(drv) && write_text("/sys/bus/nd/drivers/nd_pmem/bind", p->ns) != 0)
        return 0;
    snprintf(dir, sizeof(dir), ND "/%s/block", p->ns);
    for (int i = 0; i < 200; i++) {
        if (find_entry(dir, "pmem", name, sizeof(name), NULL)) {
            snprintf(out, outlen, "/dev/%s", name);
            return wait_for(out);
        }
        usleep(10000);
    }
    return 0;
}

/* The info block (pfn/dax superblock) lives at 4 KiB into the namespace. */
static int info_area(const char *dev, int wipe, int *nonzero)
{
    char buf[4096];
    int fd = open(dev, (wipe ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_SYNC);
    if (fd < 0)
        return -errno;
    if (pread(fd, buf, sizeof(buf), 4096) != (ssize_t)sizeof(buf)) {
        close(fd);
        return -EIO;
    }
    *nonzero = 0;
    for (size_t i = 0; i < sizeof(buf); i++)
        *nonzero |= buf[i] != 0;
    if (wipe) {
        memset(buf, 0, sizeof(buf));
        if (pwrite(fd, buf, sizeof(buf), 4096) != (ssize_t)sizeof(buf)) {
            close(fd);
            return -EIO;
        }
        fsync(fd);
    }
    close(fd);
    return 0;
}

static void describe(struct pmem *p)
{
    char path[512], buf[64], name[64];
    snprintf(path, sizeof(path), ND "/%s/resource", p->claim);
    if (read_text(path, buf, sizeof(buf)) == 0)
        p->data_phys = strtoull(buf, NULL, 0);
    if (!strcmp(p->want, "fsdax")) {
        snprintf(path, sizeof(path), ND "/%s/block", p->claim);
        if (find_entry(path, "pmem", name, sizeof(name), NULL))
            snprintf(p->dev, sizeof(p->dev), "/dev/%s", name);
    } else {
        char prefix[32];
        snprintf(prefix, sizeof(prefix), "dax%d.", p->region_id);
        for (int i = 0; i < 200 && !find_entry("/sys/bus/dax/devices", prefix, name, sizeof(name), NULL); i++)
            usleep(10000);
        if (find_entry("/sys/bus/dax/devices", prefix, name, sizeof(name), NULL))
            snprintf(p->dev, sizeof(p->dev), "/dev/%s", name);
    }
    if (p->dev[0] && !wait_for(p->dev))
        snprintf(p->error, sizeof(p->error), "%s did not appear", p->dev);
}

/* Bring the region into p->want through sysfs. Never destroys foreign data unless force. */
static int configure(struct pmem *p, int force)
{
    char claim[64], path[512], uuid[37], seed[64], raw[96];
    const char *kind = !strcmp(p->want, "fsdax") ? "pfn" : "dax";
    const char *driver = !strcmp(p->want, "fsdax") ? "nd_pmem" : "dax_pmem";
    int nonzero = 0, err;

    snprintf(path, sizeof(path), ND "/%s", p->r.name);
    if (!find_entry(path, "namespace", p->ns, sizeof(p->ns), is_namespace_dev)) {
        snprintf(p->error, sizeof(p->error), "%s has no namespace", p->r.name);
        return -1;
    }
    snprintf(p->action, sizeof(p->action), "configured");
    if (current_claim(p, claim, sizeof(claim))) {
        if (!strcmp(mode_of_claim(claim), p->want)) {
            snprintf(p->claim, sizeof(p->claim), "%s", claim);
            snprintf(p->action, sizeof(p->action), "reused");
            describe(p);
            return p->error[0] ? -1 : 0;
        }
        if (!force) {
            snprintf(p->error, sizeof(p->error),
                     "%s holds a %s info block (%s), not %s; refusing to reconfigure it without --force "
                     "(that destroys its data)", p->r.name, mode_of_claim(claim), claim, p->want);
            return -1;
        }
        snprintf(path, sizeof(path), ND "/%s/driver/unbind", claim);
        write_text(path, claim);
        snprintf(path, sizeof(path), ND "/%s/namespace", claim);
        write_text(path, "\n");
        snprintf(p->action, sizeof(p->action), "reconfigured");
        /* nd_pmem would find the old info block again and refuse the raw namespace: force it raw once. */
        snprintf(path, sizeof(path), ND "/%s/force_raw", p->ns);
        write_text(path, "1");
        force = 2; /* wipe unconditionally below */
    }
    if (!raw_blockdev(p, raw, sizeof(raw))) {
        snprintf(p->error, sizeof(p->error), "cannot bind %s to nd_pmem for its raw block device", p->ns);
        return -1;
    }
    err = info_area(raw, 0, &nonzero);
    if (err) {
        snprintf(p->error, sizeof(p->error), "reading the info block area of %s: %s", raw, strerror(-err));
        return -1;
    }
    if (nonzero || force == 2) {
        if (!force) {
            snprintf(p->error, sizeof(p->error),
                     "%s (%s) has foreign or corrupted data where the info block goes (4 KiB in); "
                     "refusing to overwrite it without --force", p->r.name, raw);
            return -1;
        }
        info_area(raw, 1, &nonzero);
        snprintf(p->action, sizeof(p->action), "reconfigured");
    }
    write_text("/sys/bus/nd/drivers/nd_pmem/unbind", p->ns);
    snprintf(path, sizeof(path), ND "/%s/force_raw", p->ns);
    write_text(path, "0");
    snprintf(path, sizeof(path), ND "/%s/%s_seed", p->r.name, kind);
    if (read_text(path, seed, sizeof(seed)) != 0 || !seed[0]) {
        snprintf(p->error, sizeof(p->error), "%s has no %s_seed", p->r.name, kind);
        return -1;
    }
    random_uuid(uuid);
    const char *attrs[][2] = {{"uuid", uuid}, {"align", "2097152"}, {"mode", "pmem"}, {"namespace", p->ns}};
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++) {
        snprintf(path, sizeof(path), ND "/%s/%s", seed, attrs[i][0]);
        if ((err = write_text(path, attrs[i][1])) != 0) {
            snprintf(p->error, sizeof(p->error), "writing %s to %s: %s", attrs[i][1], path, strerror(-err));
            return -1;
        }
    }
    snprintf(path, sizeof(path), "/sys/bus/nd/drivers/%s/bind", driver);
    if ((err = write_text(path, seed)) != 0) {
        snprintf(p->error, sizeof(p->error), "binding %s to %s: %s", seed, driver, strerror(-err));
        return -1;
    }
    snprintf(p->claim, sizeof(p->claim), "%s", seed);
    describe(p);
    return p->error[0] ? -1 : 0;
}

static void stamp_unit(char *out, size_t len, const char *token, const char *kind)
{
    snprintf(out, len, "aperture:%s:%s\n", token, kind);
}

static int check_bytes(const char *got, size_t len, const char *unit)
{
    size_t ulen = strlen(unit);
    for (size_t i = 0; i < len; i++)
        if (got[i] != unit[i % ulen])
            return 0;
    return 1;
}

/* `ndctl list -N` after configuration, when the image carries ndctl: an independent witness of the modes the
 * helper set through sysfs. Reported raw; the host parses it (emulator/results.py). */
static char ndctl_list[6144];

static void capture_ndctl(void)
{
    ndctl_list[0] = 0;
    if (access("/usr/local/bin/ndctl", X_OK) != 0)
        return;
    FILE *f = popen("/usr/local/bin/ndctl list -N 2>/dev/null", "r");
    if (!f)
        return;
    size_t n = fread(ndctl_list, 1, sizeof(ndctl_list) - 1, f);
    ndctl_list[n] = 0;
    if (pclose(f) != 0 || n == sizeof(ndctl_list) - 1)
        snprintf(ndctl_list, sizeof(ndctl_list), "error: ndctl list failed or its output was too long");
}

static void json_pmem(struct jbuf *jb, const struct pmem *p)
{
    jb_printf(jb, "\"region\":");
    jb_str(jb, p->r.name);
    jb_printf(jb, ",\"region_addr\":%llu,\"device\":", p->r.addr);
    jb_str(jb, p->dev);
    jb_printf(jb, ",\"claim\":");
    jb_str(jb, p->claim);
    jb_printf(jb, ",\"action\":");
    jb_str(jb, p->action);
    jb_printf(jb, ",\"data_phys\":%llu", p->data_phys);
    if (p->error[0]) {
        jb_printf(jb, ",\"error\":");
        jb_str(jb, p->error);
    }
    if (ndctl_list[0]) {
        jb_printf(jb, ",\"ndctl\":");
        jb_str(jb, ndctl_list);
    }
}


/* ---------------------------------------------------------------- fixture: regions configured */
static struct pmem pm[MAX_REGIONS];
static struct pmem *fsdax, *devdax; /* the first region of each mode, or NULL */

static int configured_setup(void)
{
    int expected = atoi(env_or(APERTURE_ENV_PMEM, "1"));
    const char *modes = env_or(APERTURE_ENV_PMEM_MODES, "");
    int force = atoi(env_or(APERTURE_ENV_FORCE, "0"));
    struct region regions[MAX_REGIONS];
    char modebuf[256];
    int n = nd_regions(regions, MAX_REGIONS, expected);

    memset(pm, 0, sizeof(pm));
    fsdax = devdax = NULL;
    snprintf(modebuf, sizeof(modebuf), "%s", modes);
    char *save = NULL, *tok = strtok_r(modebuf, ",", &save);
    for (int i = 0; i < n && tok; i++, tok = strtok_r(NULL, ",", &save)) {
        pm[i].r = regions[i];
        pm[i].region_id = atoi(regions[i].name + 6);
        snprintf(pm[i].want, sizeof(pm[i].want), "%s", tok);
        if (strcmp(tok, "fsdax") && strcmp(tok, "devdax"))
            continue;
        configure(&pm[i], force); /* an error stays in pm[i].error: the region's check reports it */
        if (!strcmp(tok, "fsdax") && !fsdax)
            fsdax = &pm[i];
        if (!strcmp(tok, "devdax") && !devdax)
            devdax = &pm[i];
    }
    return 0;
}

const struct fixture fixture_dax_configured = {.name = "dax_configured", .setup = configured_setup};

/* ---------------------------------------------------------------- fixture: mounted and mapped */
#define STAMP_PATH FSDAX_DIR "/aperture-persist"

struct fsdax_state {
    int mounted, mkfs;
    char *probe_map; /* 2 MiB MAP_SHARED file mapping for the probe matrix and the benchmark */
};

struct devdax_state {
    char *map;
    size_t size;
    unsigned long long align, phys;
};

static struct fsdax_state fs;
static struct devdax_state dd;

static void mount_fsdax(struct pmem *p)
{
    char cmd[512];
    mkdir(FSDAX_DIR, 0755);
    snprintf(cmd, sizeof(cmd), "mount -t ext4 -o dax=always %s " FSDAX_DIR " 2>/dev/null", p->dev);
    fs.mounted = run_cmd(cmd) == 0;
    if (!fs.mounted) { /* no file system yet (or a broken one): make one */
        fs.mkfs = 1;
        snprintf(cmd, sizeof(cmd), "/usr/local/bin/mke2fs -q -F -t ext4 -b 4096 %s 2>&1", p->dev);
        if (run_cmd(cmd) == 0) {
            snprintf(cmd, sizeof(cmd), "mount -t ext4 -o dax=always %s " FSDAX_DIR, p->dev);
            fs.mounted = run_cmd(cmd) == 0;
        }
    }
    if (!fs.mounted)
        return;
    int fd = open(FSDAX_DIR "/aperture-probe", O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    if (fd >= 0 && ftruncate(fd, 2 * MIB) == 0) {
        char *m = mmap(NULL, 2 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED) {
            memset(m, 0x11, 2 * MIB);
            fs.probe_map = m;
        }
    }
    if (fd >= 0)
        close(fd);
}

static void map_devdax(struct pmem *p)
{
    char path[512], buf[64];
    const char *name = strrchr(p->dev, '/') + 1;
    dd.align = 2 * MIB;
    snprintf(path, sizeof(path), "/sys/bus/dax/devices/%s/size", name);
    if (read_text(path, buf, sizeof(buf)) == 0)
        dd.size = strtoull(buf, NULL, 0);
    snprintf(path, sizeof(path), "/sys/bus/dax/devices/%s/align", name);
    if (read_text(path, buf, sizeof(buf)) == 0)
        dd.align = strtoull(buf, NULL, 0);
    int fd = open(p->dev, O_RDWR | O_CLOEXEC);
    if (fd >= 0 && dd.size >= 4 * MIB && dd.size % dd.align == 0) {
        char *m = mmap(NULL, dd.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m != MAP_FAILED) {
            dd.map = m;
            *(volatile char *)dd.map = *(volatile char *)dd.map;
            dd.phys = virt_to_phys(dd.map);
        }
    }
    if (fd >= 0)
        close(fd);
}

static int dax_setup(void)
{
    memset(&fs, 0, sizeof(fs));
    memset(&dd, 0, sizeof(dd));
    capture_ndctl();
    if (fsdax && !fsdax->error[0])
        mount_fsdax(fsdax);
    if (devdax && !devdax->error[0] && devdax->dev[0])
        map_devdax(devdax);
    return 0;
}

static void dax_teardown(void)
{
    if (fs.probe_map)
        munmap(fs.probe_map, 2 * MIB);
    if (dd.map)
        munmap(dd.map, dd.size);
    if (fs.mounted)
        run_cmd("umount " FSDAX_DIR);
    memset(&fs, 0, sizeof(fs));
    memset(&dd, 0, sizeof(dd));
}

const struct fixture fixture_dax = {
    .name = "dax", .needs = &fixture_dax_configured, .setup = dax_setup, .teardown = dax_teardown,
};

struct dax_mappings dax_mappings(void)
{
    return (struct dax_mappings){.devdax = dd.map, .devdax_size = dd.size, .fsdax_file = fs.probe_map};
}

/* ---------------------------------------------------------------- checks */
static unsigned long long fiemap_physical(int fd)
{
    struct {
        struct fiemap fm;
        struct fiemap_extent ext[1];
    } req;
    memset(&req, 0, sizeof(req));
    req.fm.fm_length = ~0ULL;
    req.fm.fm_flags = FIEMAP_FLAG_SYNC;
    req.fm.fm_extent_count = 1;
    if (ioctl(fd, FS_IOC_FIEMAP, &req) != 0 || req.fm.fm_mapped_extents < 1)
        return 0;
    return req.ext[0].fe_physical;
}

static int is_dax_file(const char *path)
{
    struct statx st;
    if (statx(AT_FDCWD, path, 0, STATX_BASIC_STATS, &st) != 0)
        return 0;
    return (st.stx_attributes_mask & STATX_ATTR_DAX) && (st.stx_attributes & STATX_ATTR_DAX);
}

/* Second boot of --reboot: the stamps the first boot wrote (token $aperture_expect) are still there. */
static void check_persistence(void)
{
    const char *expect = getenv(APERTURE_ENV_EXPECT);
    char unit[128], buf[STAMP_LEN];
    struct jbuf jb;
    int have = 0, intact = 1;

    if (!expect)
        return;
    jb_init(&jb);
    jb_printf(&jb, "{");
    if (fs.mounted) {
        int fd = open(STAMP_PATH, O_RDONLY | O_CLOEXEC);
        int good = fd >= 0 && pread(fd, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf);
        stamp_unit(unit, sizeof(unit), expect, "fsdax");
        good = good && check_bytes(buf, sizeof(buf), unit);
        if (fd >= 0)
            close(fd);
        jb_printf(&jb, "\"fsdax\":%s,", good ? "true" : "false");
        have = 1;
        intact &= good;
    }
    if (dd.map) {
        stamp_unit(unit, sizeof(unit), expect, "devdax");
        int good = check_bytes(dd.map + DEVDAX_STAMP_OFF, STAMP_LEN, unit);
        jb_printf(&jb, "\"devdax\":%s,", good ? "true" : "false");
        have = 1;
        intact &= good;
    }
    jb_printf(&jb, "\"expected_token\":");
    jb_str(&jb, expect);
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_DAX_PERSISTENCE, have && intact, jb.buf);
}

static void check_fsdax(void)
{
    const char *token = env_or(APERTURE_ENV_STAMP, "none");
    char unit[128], buf[STAMP_LEN];
    struct jbuf jb;
    int ok = 0;
    unsigned long long fe = 0, stamp_phys = 0, page_phys = 0;

    if (!fsdax)
        return;
    jb_init(&jb);
    jb_printf(&jb, "{");
    json_pmem(&jb, fsdax);
    jb_printf(&jb, ",\"mkfs\":%s,\"mounted\":%s", fs.mkfs ? "true" : "false", fs.mounted ? "true" : "false");
    if (fs.mounted) {
        stamp_unit(unit, sizeof(unit), token, "fsdax");
        fill_stamp(buf, sizeof(buf), unit);
        int fd = open(STAMP_PATH, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0644);
        if (fd >= 0 && pwrite(fd, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf) && fsync(fd) == 0) {
            fe = fiemap_physical(fd);
            stamp_phys = fe ? fsdax->data_phys + fe : 0;
            char *m = mmap(NULL, sizeof(buf), PROT_READ, MAP_SHARED, fd, 0);
            if (m != MAP_FAILED) {
                volatile char c = m[0];
                (void)c;
                page_phys = virt_to_phys(m);
                munmap(m, sizeof(buf));
            }
        }
        if (fd >= 0)
            close(fd);
        int dax = is_dax_file(STAMP_PATH);
        ok = dax && stamp_phys && page_phys == stamp_phys;
        jb_printf(&jb, ",\"statx_dax\":%s,\"fiemap_physical\":%llu,\"stamp_phys\":%llu,\"pagemap_phys\":%llu,"
                  "\"stamp_len\":%d,\"stamp\":", dax ? "true" : "false", fe, stamp_phys, page_phys, STAMP_LEN);
        jb_str(&jb, unit);
    }
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_DAX_FSDAX, ok && !fsdax->error[0], jb.buf);
}

static void check_map_sync(void)
{
    struct jbuf jb;
    int ok = 0, err = 0;
    unsigned long long phys = 0;

    if (!fsdax)
        return;
    jb_init(&jb);
    if (fs.mounted) {
        int fd = open(FSDAX_DIR "/aperture-mapsync", O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0 && ftruncate(fd, MAPSYNC_LEN) == 0) {
            char *m = mmap(NULL, MAPSYNC_LEN, PROT_READ | PROT_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0);
            if (m == MAP_FAILED) {
                err = errno;
            } else {
                for (size_t i = 0; i < MAPSYNC_LEN; i++)
                    m[i] = (char)(i * 7 + 3);
                flush_range(m, MAPSYNC_LEN);
                phys = virt_to_phys(m);
                munmap(m, MAPSYNC_LEN);
                char *back = malloc(MAPSYNC_LEN);
                ok = back && pread(fd, back, MAPSYNC_LEN, 0) == (ssize_t)MAPSYNC_LEN;
                for (size_t i = 0; ok && i < MAPSYNC_LEN; i++)
                    ok = back[i] == (char)(i * 7 + 3);
                free(back);
            }
        } else {
            err = errno;
        }
        if (fd >= 0)
            close(fd);
    }
    jb_printf(&jb, "{\"mmap\":\"%s\",\"flush\":\"%s\",\"bytes\":%llu,\"phys\":%llu,\"mounted\":%s}",
              !fs.mounted ? "not attempted: no fsdax mount" : err ? errno_name(err) : "ok", flush_method(),
              MAPSYNC_LEN, phys, fs.mounted ? "true" : "false");
    report_check(APERTURE_CHECK_DAX_MAP_SYNC, ok, jb.buf);
}

static void check_devdax(void)
{
    const char *token = env_or(APERTURE_ENV_STAMP, "none");
    char unit[128];
    struct jbuf jb;
    int ok = 0;
    unsigned long long stamp_phys = 0;

    if (!devdax)
        return;
    jb_init(&jb);
    jb_printf(&jb, "{");
    json_pmem(&jb, devdax);
    jb_printf(&jb, ",\"size\":%zu,\"align\":%llu,\"mapped\":%s", dd.size, dd.align ? dd.align : 2 * MIB,
              dd.map ? "true" : "false");
    if (dd.map) {
        char *stamp = dd.map + DEVDAX_STAMP_OFF;
        /* Pattern over the first 2 MiB, verified after a flush. */
        for (size_t i = 0; i < DEVDAX_STAMP_OFF; i++)
            dd.map[i] = (char)(i * 13 + 1);
        flush_range(dd.map, DEVDAX_STAMP_OFF);
        ok = 1;
        for (size_t i = 0; ok && i < DEVDAX_STAMP_OFF; i++)
            ok = dd.map[i] == (char)(i * 13 + 1);
        stamp_unit(unit, sizeof(unit), token, "devdax");
        fill_stamp(stamp, STAMP_LEN, unit);
        flush_range(stamp, STAMP_LEN);
        stamp_phys = virt_to_phys(stamp);
        ok = ok && stamp_phys == devdax->data_phys + DEVDAX_STAMP_OFF;
        jb_printf(&jb, ",\"pattern_bytes\":%llu,\"pagemap_phys\":%llu,\"stamp_phys\":%llu,\"stamp_len\":%d,"
                  "\"stamp\":", DEVDAX_STAMP_OFF, dd.phys, stamp_phys, STAMP_LEN);
        jb_str(&jb, unit);
    }
    jb_printf(&jb, "}");
    report_check(APERTURE_CHECK_DAX_DEVDAX, ok && !devdax->error[0], jb.buf);
}

/* ---------------------------------------------------------------- probe matrix */
struct bar {
    char addr[256];
    unsigned long long phys, size;
    char *map;
};

static int is_ivshmem(const char *dir, const char *name)
{
    char path[512], v[32], d[32];
    snprintf(path, sizeof(path), "%s/%s/vendor", dir, name);
    if (read_text(path, v, sizeof(v)) != 0)
        return 0;
    snprintf(path, sizeof(path), "%s/%s/device", dir, name);
    if (read_text(path, d, sizeof(d)) != 0)
        return 0;
    return !strcmp(v, "0x1af4") && !strcmp(d, "0x1110");
}

static void map_bar2(struct bar *b)
{
    char path[512], text[2048];
    const char *want = env_or(APERTURE_ENV_PROBE_BAR, "");
    char path0[512];
    snprintf(path0, sizeof(path0), "/sys/bus/pci/devices/%s", want);
    if (want[0] && path_exists(path0))
        snprintf(b->addr, sizeof(b->addr), "%s", want);
    else if (!find_entry("/sys/bus/pci/devices", "0000:", b->addr, sizeof(b->addr), is_ivshmem))
        return;
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource", b->addr);
    if (read_text(path, text, sizeof(text)) != 0)
        return;
    char *line = text;
    for (int i = 0; i < 2 && line; i++)
        line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL;
    if (!line)
        return;
    unsigned long long start = strtoull(line, &line, 0), end = strtoull(line, NULL, 0);
    if (!start || end <= start)
        return;
    b->phys = start;
    b->size = end - start + 1;
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource2", b->addr);
    int fd = open(path, O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return;
    char *m = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m != MAP_FAILED)
        b->map = m;
}

static const char *odirect_into(int src, void *dst)
{
    if (!dst)
        return "unmapped";
    ssize_t n = pread(src, dst, 4096, 0);
    if (n == 4096)
        return "ok";
    return n < 0 ? errno_name(errno) : "short";
}

static void check_probe_matrix(void)
{
    if (!fsdax || !fsdax->dev[0]) {
        report_log("zone_device.probe not run: it reads with O_DIRECT from an fsdax NVDIMM, and there is none");
        return;
    }
    struct jbuf jb;
    struct bar bar = {0};
    int src = fsdax && fsdax->dev[0] ? open(fsdax->dev, O_RDONLY | O_DIRECT | O_CLOEXEC) : -1;
    void *ram = aligned_alloc(4096, 4096);

    map_bar2(&bar);
    if (ram)
        memset(ram, 0, 4096);
    jb_init(&jb);
    jb_printf(&jb, "{\"source\":");
    jb_str(&jb, fsdax ? fsdax->dev : "");
    jb_printf(&jb, ",\"source_open\":\"%s\",\"rows\":[",
              src >= 0 ? "ok" : (fsdax && fsdax->dev[0]) ? errno_name(errno) : "no fsdax device");
    if (src >= 0) {
        /* Do each read before asking pagemap: a page is only present once touched. */
        char *dd_dst = dd.map ? dd.map + 4 * MIB : NULL;
        const char *r_ram = odirect_into(src, ram);
        const char *r_dd = dd_dst ? odirect_into(src, dd_dst) : "absent";
        const char *r_fs = fs.probe_map ? odirect_into(src, fs.probe_map) : "absent";
        const char *r_bar = bar.map ? odirect_into(src, bar.map) : "absent";
        jb_printf(&jb, "{\"memory\":\"ram\",\"result\":\"%s\",\"phys\":%llu},", r_ram,
                  ram ? virt_to_phys(ram) : 0ULL);
        jb_printf(&jb, "{\"memory\":\"devdax\",\"result\":\"%s\",\"phys\":%llu},", r_dd,
                  dd_dst ? virt_to_phys(dd_dst) : 0ULL);
        jb_printf(&jb, "{\"memory\":\"fsdax\",\"result\":\"%s\",\"phys\":%llu},", r_fs,
                  fs.probe_map ? virt_to_phys(fs.probe_map) : 0ULL);
        jb_printf(&jb, "{\"memory\":\"bar\",\"result\":\"%s\",\"phys\":%llu,\"pagemap_phys\":%llu,\"pci\":",
                  r_bar, bar.phys, bar.map ? virt_to_phys(bar.map) : 0ULL);
        jb_str(&jb, bar.addr);
        jb_printf(&jb, ",\"size\":%llu},", bar.size);
        p2pmem_probe_row(&jb);
        close(src);
    }
    jb_printf(&jb, "]}");
    /* The host decides ok against the kernel's configuration; the guest reports what happened. */
    report_check(APERTURE_CHECK_ZONE_DEVICE_PROBE, src >= 0, jb.buf);
    free(ram);
}

#define DAX_CHECK(id, check_name, function, at) \
    TEST(id, .name = check_name, .fixture = &fixture_dax, .fn = function, .tags = TAG_DEFAULT | TAG_DAX, .order = at)

DAX_CHECK(check_dax_persistence, APERTURE_CHECK_DAX_PERSISTENCE, check_persistence, 100);
DAX_CHECK(check_dax_fsdax, APERTURE_CHECK_DAX_FSDAX, check_fsdax, 110);
DAX_CHECK(check_dax_map_sync, APERTURE_CHECK_DAX_MAP_SYNC, check_map_sync, 120);
DAX_CHECK(check_dax_devdax, APERTURE_CHECK_DAX_DEVDAX, check_devdax, 130);
DAX_CHECK(check_zone_device_probe, APERTURE_CHECK_ZONE_DEVICE_PROBE, check_probe_matrix, 140);
