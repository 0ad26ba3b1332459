/*
 * A hostile guest: a bare-metal program that moat boots in place of a
 * kernel (64-bit Linux boot protocol: long mode, the first 1 GiB identity
 * mapped, %rsi = the zero page). It finds moat's virtio-mmio devices on the
 * command line and drives them itself, as no well-behaved driver would:
 * looping chains, chains longer than the queue, buffers outside RAM and in
 * the MMIO hole, lengths that wrap, indirect tables that point at
 * themselves, queue sizes of 0 or not powers of two, rings outside RAM,
 * ready cleared and resets while requests are in flight, avail index
 * jumps, notifications for queues that do not exist, features never
 * offered, block requests past the end or with a read-only status byte,
 * network frames of 0 bytes and over 64 KiB; then a seeded random mix.
 *
 * Then it checks that the devices still work once reset (a block write and
 * read back, entropy, a frame sent), says HOSTILE-IDLE and waits for a byte
 * on the serial port (the host measures moat's CPU meanwhile), and resets
 * the machine through the i8042, which ends moat with status 0.
 *
 * Block writes go only to the second half of each disk (or past its end):
 * the host checks that the first half is unchanged.
 *
 * Output: HOSTILE-* lines on the serial port; HOSTILE-FAIL names a check
 * that failed, HOSTILE-DONE fails=N sums up.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* ---- ports, MMIO, time ---- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 r32(u64 a) { return *(volatile u32 *)a; }
static inline void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
/* A spin step. Not PAUSE: a nested hypervisor may intercept every one. */
static inline void pause(void) { __asm__ volatile("" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static void putc_(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, c);
}
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putn(u64 n)
{
    char b[21];
    int i = 20;
    b[i] = 0;
    do { b[--i] = '0' + n % 10; n /= 10; } while (n);
    puts_(b + i);
}
static void puthex(u64 n)
{
    puts_("0x");
    for (int i = 60; i >= 0; i -= 4)
        putc_("0123456789abcdef"[(n >> i) & 15]);
}

static void *memset_(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memset(void *d, int c, u64 n) { return memset_(d, c, n); }
void *memcpy(void *d, const void *s, u64 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }

static u64 fails;
static void fail(const char *what, u64 detail)
{
    fails++;
    puts_("HOSTILE-FAIL ");
    puts_(what);
    putc_(' ');
    puthex(detail);
    putc_('\n');
}

/* xorshift64: the random mix, reproducible from the seed. */
static u64 seed = 0x9e3779b97f4a7c15;
static u64 rnd(void) { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; return seed; }
static u64 below(u64 n) { return n ? rnd() % n : 0; }

/* ---- page tables: map 3-4 GiB, where moat's devices are ---- */

static u64 pd_high[512] __attribute__((aligned(4096)));

static void map_mmio(void)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL);
    u64 *pdpt = (u64 *)(pml4[0] & 0x000ffffffffff000UL);
    for (u64 i = 0; i < 512; i++)
        pd_high[i] = (0xc0000000UL + (i << 21)) | 0x83 | 0x18; /* P RW PS PWT PCD */
    pdpt[3] = (u64)pd_high | 3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

/* ---- virtio-mmio ---- */

enum {
    MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, DEV_FEAT = 0x010, DEV_FEAT_SEL = 0x014,
    DRV_FEAT = 0x020, DRV_FEAT_SEL = 0x024, QUEUE_SEL = 0x030, QUEUE_NUM_MAX = 0x034,
    QUEUE_NUM = 0x038, QUEUE_READY = 0x044, QUEUE_NOTIFY = 0x050, INT_STATUS = 0x060,
    INT_ACK = 0x064, STATUS = 0x070, QUEUE_DESC = 0x080, QUEUE_AVAIL = 0x090, QUEUE_USED = 0x0a0,
    CONFIG = 0x100,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_NEEDS_RESET = 0x40 };
enum { F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4 };
enum { ID_NET = 1, ID_BLK = 2, ID_RNG = 4, ID_VSOCK = 19 };

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

#define MAXQ 3
#define QSIZE 64
struct queue {
    u16 size;
    u16 avail_idx, used_seen, next_free;
    struct desc *desc;
    u16 *avail; /* flags, idx, ring[size], used_event */
    u8 *used;   /* flags, idx, ring[size] of (id, len), avail_event */
};

struct dev {
    u64 base;
    u32 id;
    u32 nq;
    u64 features; /* offered */
    int read_only;
    u64 sectors;
    struct queue q[MAXQ];
};

#define MAXDEV 8
static struct dev devs[MAXDEV];
static int ndevs;

/* Ring memory: one 16 KiB block per queue of each device. */
static u8 rings[MAXDEV][MAXQ][16384] __attribute__((aligned(4096)));
/* Buffers the requests point at. */
static u8 buf[256 * 1024] __attribute__((aligned(4096)));
/* An indirect table. */
static struct desc itable[1024] __attribute__((aligned(4096)));

static u16 used_idx(struct queue *q) { barrier(); return *(volatile u16 *)(q->used + 2); }

static u64 offered_features(struct dev *d)
{
    w32(d->base + DEV_FEAT_SEL, 0);
    u64 lo = r32(d->base + DEV_FEAT);
    w32(d->base + DEV_FEAT_SEL, 1);
    return lo | (u64)r32(d->base + DEV_FEAT) << 32;
}

static void reset(struct dev *d)
{
    w32(d->base + STATUS, 0);
    /* Reading 0 back means the reset is done (virtio 1.2, 4.2.3.1). */
    for (int i = 0; i < 1000000 && r32(d->base + STATUS); i++)
        pause();
}

static void set_queue_addrs(struct dev *d, u64 desc, u64 avail, u64 used)
{
    w32(d->base + QUEUE_DESC, (u32)desc);
    w32(d->base + QUEUE_DESC + 4, desc >> 32);
    w32(d->base + QUEUE_AVAIL, (u32)avail);
    w32(d->base + QUEUE_AVAIL + 4, avail >> 32);
    w32(d->base + QUEUE_USED, (u32)used);
    w32(d->base + QUEUE_USED + 4, used >> 32);
}

/* A proper set-up with queues of `size` (0: the device's largest, capped
 * at QSIZE). Returns 0, or -1 if the device refused. */
static int setup(struct dev *d, u64 features, u16 size)
{
    reset(d);
    w32(d->base + STATUS, S_ACK);
    w32(d->base + STATUS, S_ACK | S_DRIVER);
    w32(d->base + DRV_FEAT_SEL, 0);
    w32(d->base + DRV_FEAT, (u32)features);
    w32(d->base + DRV_FEAT_SEL, 1);
    w32(d->base + DRV_FEAT, features >> 32);
    w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(r32(d->base + STATUS) & S_FEATURES_OK))
        return -1;
    int di = (int)(d - devs);
    for (u32 i = 0; i < d->nq; i++) {
        struct queue *q = &d->q[i];
        w32(d->base + QUEUE_SEL, i);
        u32 max = r32(d->base + QUEUE_NUM_MAX);
        u16 n = size ? size : (max < QSIZE ? max : QSIZE);
        memset_(rings[di][i], 0, sizeof rings[di][i]);
        q->size = n;
        q->avail_idx = q->used_seen = q->next_free = 0;
        q->desc = (struct desc *)rings[di][i];
        q->avail = (u16 *)(rings[di][i] + 16 * QSIZE);
        q->used = rings[di][i] + 8192;
        w32(d->base + QUEUE_NUM, n);
        set_queue_addrs(d, (u64)q->desc, (u64)q->avail, (u64)q->used);
        w32(d->base + QUEUE_READY, 1);
    }
    w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 0;
}

/* Puts `n` descriptors at the next free slots, chained in order unless
 * the caller set its own flags (raw), and makes the head available. */
static u16 post(struct queue *q, const struct desc *ds, int n, int raw)
{
    u16 head = q->next_free % (q->size ? q->size : 1);
    for (int i = 0; i < n; i++) {
        u16 slot = (head + i) % q->size;
        struct desc x = ds[i];
        if (!raw) {
            x.flags = (x.flags & ~F_NEXT) | (i + 1 < n ? F_NEXT : 0);
            x.next = (slot + 1) % q->size;
        }
        q->desc[slot] = x;
    }
    q->next_free = (head + n) % q->size;
    q->avail[2 + q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    barrier();
    return head;
}

static void notify(struct dev *d, u32 queue) { barrier(); w32(d->base + QUEUE_NOTIFY, queue); }

/* Waits until queue `q` has used `target` entries in all, or the device
 * asks for a reset, or about `spins` pauses pass. 1: used; 0: not. */
static int wait_used(struct dev *d, struct queue *q, u16 target, u64 spins)
{
    for (u64 i = 0; i < spins; i++) {
        if ((u16)(used_idx(q) - target) < 0x8000)
            return 1;
        if (i % 4096 == 0 && (r32(d->base + STATUS) & S_NEEDS_RESET))
            return 0;
        pause();
    }
    return 0;
}

#define SHORT 200000UL   /* a hostile request: give the device a moment */
#define LONG 400000000UL /* a proper request in the slowest rig */

/* ---- a well-behaved block request, for the checks ---- */

struct blk_hdr { u32 type; u32 reserved; u64 sector; };

static int blk_rw(struct dev *d, int write, u64 sector, u8 *data, u32 len)
{
    struct queue *q = &d->q[0];
    struct blk_hdr *h = (struct blk_hdr *)(buf + 0x3f000);
    u8 *status = buf + 0x3f800;
    h->type = write ? 1 : 0;
    h->reserved = 0;
    h->sector = sector;
    *status = 0xff;
    struct desc ds[3] = {
        { (u64)h, 16, 0, 0 },
        { (u64)data, len, write ? 0 : F_WRITE, 0 },
        { (u64)status, 1, F_WRITE, 0 },
    };
    u16 target = q->avail_idx + 1;
    post(q, ds, 3, 0);
    notify(d, 0);
    if (!wait_used(d, q, target, LONG))
        return -1;
    return *status;
}

/* ---- the attacks ---- */

static u64 mmio_hole(void) { return devs[0].base; }

static void attack_chain(struct dev *d, u32 qi, const struct desc *ds, int n, int raw)
{
    if (setup(d, d->features, 0))
        return;
    struct queue *q = &d->q[qi % d->nq];
    u16 target = q->avail_idx + 1;
    post(q, ds, n, raw);
    notify(d, qi % d->nq);
    wait_used(d, q, target, SHORT);
}

static void attacks_common(struct dev *d)
{
    u64 b = (u64)buf;
    /* Looping chain: 0 -> 1 -> 0. */
    struct desc loop[2] = { { b, 64, F_NEXT, 1 }, { b + 64, 64, F_NEXT | F_WRITE, 0 } };
    for (u32 qi = 0; qi < d->nq; qi++) {
        if (setup(d, d->features, 8))
            break;
        struct queue *q = &d->q[qi];
        q->next_free = 0;
        u16 t = q->avail_idx + 1;
        post(q, loop, 2, 1);
        notify(d, qi);
        wait_used(d, q, t, SHORT);
    }
    /* A chain longer than the queue (8 entries, 8 linked, the last back to 0). */
    struct desc longc[8];
    for (int i = 0; i < 8; i++)
        longc[i] = (struct desc){ b + 512 * i, 512, F_NEXT | (i > 3 ? F_WRITE : 0), (u16)((i + 1) % 8) };
    for (u32 qi = 0; qi < d->nq; qi++) {
        if (setup(d, d->features, 8))
            break;
        d->q[qi].next_free = 0;
        post(&d->q[qi], longc, 8, 1);
        notify(d, qi);
        wait_used(d, &d->q[qi], 1, SHORT);
    }
    /* Buffers outside RAM, in the MMIO hole (the device's own registers),
     * lengths that wrap. */
    u64 addrs[] = { 0x0000100000000000UL, mmio_hole(), 0xfee00000UL, 0xfffffffffffff000UL,
                    b + sizeof buf - 16 };
    u32 lens[] = { 4096, 4096, 64, 0x2000, 0xffffffff };
    for (u32 qi = 0; qi < d->nq; qi++)
        for (int i = 0; i < 5; i++) {
            struct desc ds[3] = { { addrs[i], lens[i], 0, 0 }, { addrs[i], lens[i], F_WRITE, 0 },
                                  { b, 1, F_WRITE, 0 } };
            attack_chain(d, qi, ds, 3, 0);
            struct desc w[2] = { { b, 16, 0, 0 }, { addrs[i], lens[i], F_WRITE, 0 } };
            attack_chain(d, qi, w, 2, 0);
        }
    /* An indirect table that points at itself, and one of 1024 entries that
     * loop (INDIRECT was never offered). */
    for (u32 qi = 0; qi < d->nq; qi++) {
        itable[0] = (struct desc){ (u64)itable, 16 * 2, F_INDIRECT | F_NEXT, 1 };
        itable[1] = (struct desc){ (u64)itable, 16, F_INDIRECT, 0 };
        struct desc ind = { (u64)itable, 32, F_INDIRECT, 0 };
        attack_chain(d, qi, &ind, 1, 1);
        for (int i = 0; i < 1024; i++)
            itable[i] = (struct desc){ b + 8 * i, 8, F_NEXT | F_WRITE, (u16)((i + 1) % 1024) };
        struct desc big = { (u64)itable, sizeof itable, F_INDIRECT, 0 };
        attack_chain(d, qi, &big, 1, 1);
        struct desc odd = { (u64)itable + 3, 17, F_INDIRECT, 0 };
        attack_chain(d, qi, &odd, 1, 1);
    }
    /* Queue sizes 0, 3 and 65535; rings outside RAM and in the hole. */
    u16 sizes[] = { 0, 3, 65535 };
    for (int i = 0; i < 3; i++) {
        reset(d);
        w32(d->base + STATUS, S_ACK | S_DRIVER);
        w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        w32(d->base + QUEUE_SEL, 0);
        w32(d->base + QUEUE_NUM, sizes[i]);
        set_queue_addrs(d, (u64)rings[0][0], (u64)rings[0][0] + 4096, (u64)rings[0][0] + 8192);
        w32(d->base + QUEUE_READY, 1);
        w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        notify(d, 0);
    }
    u64 ring_at[] = { 0x0000100000000000UL, mmio_hole(), 0xfffffffffffff000UL, 0x7 };
    for (int i = 0; i < 4; i++) {
        reset(d);
        w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        w32(d->base + QUEUE_SEL, 0);
        w32(d->base + QUEUE_NUM, 8);
        set_queue_addrs(d, ring_at[i], ring_at[i] + 4096, ring_at[i] + 8192);
        w32(d->base + QUEUE_READY, 1);
        w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        notify(d, 0);
        notify(d, 1);
    }
    /* Ready cleared and a reset while requests are in flight; the rings
     * rewritten under the device. */
    for (u32 qi = 0; qi < d->nq; qi++) {
        if (setup(d, d->features, 0))
            break;
        struct queue *q = &d->q[qi];
        for (int i = 0; i < 16; i++) {
            struct desc ds[2] = { { b + 4096 * i, 16, 0, 0 }, { b + 4096 * i + 512, 513, F_WRITE, 0 } };
            post(q, ds, 2, 0);
        }
        notify(d, qi);
        w32(d->base + QUEUE_SEL, qi);
        w32(d->base + QUEUE_READY, 0);
        notify(d, qi);
        memset_(q->desc, 0xff, 16 * q->size);
        notify(d, qi);
        reset(d);
        notify(d, qi);
    }
    /* Avail index jumps ahead by 30000, then back. */
    for (u32 qi = 0; qi < d->nq; qi++) {
        if (setup(d, d->features, 0))
            break;
        struct queue *q = &d->q[qi];
        q->avail[1] = 30000;
        notify(d, qi);
        wait_used(d, q, 1, SHORT);
        q->avail[1] = 0xffff;
        notify(d, qi);
    }
    /* Notifications for queues that do not exist. */
    if (!setup(d, d->features, 0)) {
        u32 qs[] = { 3, 7, 0xffff, 0xffffffff };
        for (int i = 0; i < 4; i++)
            notify(d, qs[i]);
    }
    /* Features never offered: FEATURES_OK must not stick. */
    reset(d);
    w32(d->base + STATUS, S_ACK | S_DRIVER);
    w32(d->base + DRV_FEAT_SEL, 0);
    w32(d->base + DRV_FEAT, 0xffffffff);
    w32(d->base + DRV_FEAT_SEL, 1);
    w32(d->base + DRV_FEAT, 0xffffffff);
    w32(d->base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if ((~d->features) && (r32(d->base + STATUS) & S_FEATURES_OK))
        fail("features-never-offered-accepted", d->id);
    /* Registers past the end, every width of write at odd offsets. */
    for (u32 off = 0; off < 0x200; off += 3)
        *(volatile u8 *)(d->base + off + 0x100) = (u8)off;
    reset(d);
}

static void attacks_block(struct dev *d)
{
    u64 b = (u64)buf;
    struct blk_hdr *h = (struct blk_hdr *)buf;
    u64 sectors[] = { d->sectors, d->sectors - 1, 0xffffffffffffffffUL, 0x8000000000000000UL,
                      d->sectors - 8 };
    for (int i = 0; i < 5; i++)
        for (u32 type = 0; type < 2; type++) {
            /* Past the end (the last one: 8 sectors from the end, 16 long). */
            h->type = type;
            h->sector = sectors[i];
            struct desc ds[3] = { { b, 16, 0, 0 }, { b + 4096, 8192, type ? 0 : F_WRITE, 0 },
                                  { b + 0x3000, 1, F_WRITE, 0 } };
            attack_chain(d, 0, ds, 3, 0);
        }
    /* A read-only status byte (no WRITE on the last descriptor), a
     * writable header, a length that is not whole sectors, unknown types,
     * GET_ID with a 1-byte buffer, a flush with data. */
    h->type = 1;
    h->sector = d->sectors / 2;
    struct desc ro[3] = { { b, 16, 0, 0 }, { b + 4096, 512, 0, 0 }, { b + 0x3000, 1, 0, 0 } };
    attack_chain(d, 0, ro, 3, 0);
    struct desc wh[3] = { { b, 16, F_WRITE, 0 }, { b + 4096, 512, F_WRITE, 0 }, { b + 0x3000, 1, F_WRITE, 0 } };
    attack_chain(d, 0, wh, 3, 0);
    u32 types[] = { 0, 1, 4, 8, 11, 13, 0xffffffff };
    for (int i = 0; i < 7; i++) {
        h->type = types[i];
        h->sector = d->sectors / 2 + 1;
        struct desc odd[3] = { { b, 16, 0, 0 }, { b + 4096, 511, types[i] == 1 ? 0 : F_WRITE, 0 },
                               { b + 0x3000, 1, F_WRITE, 0 } };
        attack_chain(d, 0, odd, 3, 0);
        struct desc tiny[2] = { { b, 16, 0, 0 }, { b + 0x3000, 1, F_WRITE, 0 } };
        attack_chain(d, 0, tiny, 2, 0);
    }
    /* A header split over 16 one-byte descriptors, data over 130 segments. */
    h->type = 0;
    h->sector = 0;
    struct desc split[20];
    for (int i = 0; i < 16; i++)
        split[i] = (struct desc){ b + i, 1, 0, 0 };
    split[16] = (struct desc){ b + 4096, 512, F_WRITE, 0 };
    split[17] = (struct desc){ b + 0x3000, 1, F_WRITE, 0 };
    attack_chain(d, 0, split, 18, 0);
    if (!setup(d, d->features, 0)) {
        static struct desc many[140];
        many[0] = (struct desc){ b, 16, 0, 0 };
        for (int i = 1; i < 139; i++)
            many[i] = (struct desc){ b + 4096 + 512 * i, 512, F_WRITE, 0 };
        many[139] = (struct desc){ b + 0x3000, 1, F_WRITE, 0 };
        /* As an indirect table: the queue has only 64 entries. */
        for (int i = 0; i < 140; i++) {
            itable[i] = many[i];
            itable[i].flags |= i < 139 ? F_NEXT : 0;
            itable[i].next = i + 1;
        }
        struct desc ind = { (u64)itable, 16 * 140, F_INDIRECT, 0 };
        post(&d->q[0], &ind, 1, 1);
        notify(d, 0);
        wait_used(d, &d->q[0], 1, SHORT);
    }
    reset(d);
}

static void attacks_net(struct dev *d)
{
    u64 b = (u64)buf;
    memset_(buf, 0, 0x30000);
    /* Transmit: a 0-byte descriptor, a bare header, 70 KiB and 200 KiB
     * frames, a frame split into 64 pieces. */
    struct desc zero = { b, 0, 0, 0 };
    attack_chain(d, 1, &zero, 1, 0);
    struct desc bare = { b, 12, 0, 0 };
    attack_chain(d, 1, &bare, 1, 0);
    struct desc big[2] = { { b, 12, 0, 0 }, { b + 4096, 70 * 1024, 0, 0 } };
    attack_chain(d, 1, big, 2, 0);
    struct desc huge[2] = { { b, 12, 0, 0 }, { b + 4096, 200 * 1024, 0, 0 } };
    attack_chain(d, 1, huge, 2, 0);
    struct desc pieces[64];
    for (int i = 0; i < 64; i++)
        pieces[i] = (struct desc){ b + 1024 * i, i ? 60 : 12, 0, 0 };
    attack_chain(d, 1, pieces, 64, 0);
    /* Receive: buffers that are read-only, 0 bytes, or smaller than a header. */
    struct desc rx[3] = { { b, 1500, 0, 0 }, { b, 0, F_WRITE, 0 }, { b, 4, F_WRITE, 0 } };
    for (int i = 0; i < 3; i++)
        attack_chain(d, 0, &rx[i], 1, 0);
    reset(d);
}

static void attacks_vsock(struct dev *d)
{
    /* Packets: a request to a port nobody listens on, data for a
     * connection that does not exist, a header of 44 bytes split in two,
     * a length field larger than the buffer, an unknown op and type. */
    struct hdr { u64 src_cid, dst_cid; u32 src_port, dst_port, len; u16 type, op; u32 flags, buf_alloc, fwd_cnt; }
        __attribute__((packed));
    struct hdr *h = (struct hdr *)buf;
    struct hdr cases[] = {
        { 3, 2, 1000, 9, 0, 1, 1, 0, 65536, 0 },
        { 3, 2, 1001, 9, 100, 1, 5, 0, 65536, 0 },
        { 3, 2, 1002, 9, 0xffffffff, 1, 5, 0, 65536, 0 },
        { 3, 2, 1003, 9, 0, 7, 99, 0, 0, 0 },
        { 99, 77, 1004, 9, 0, 1, 1, 0, 0xffffffff, 0xffffffff },
        { 3, 2, 1005, 9, 0, 1, 4, 3, 0, 0 },
    };
    for (int i = 0; i < 6; i++) {
        *h = cases[i];
        struct desc one = { (u64)buf, 44 + (cases[i].len == 100 ? 100 : 0), 0, 0 };
        attack_chain(d, 1, &one, 1, 0);
        struct desc two[2] = { { (u64)buf, 20, 0, 0 }, { (u64)buf + 20, 24 + 4096, 0, 0 } };
        attack_chain(d, 1, two, 2, 0);
    }
    /* Event and receive queues with read-only buffers. */
    struct desc ev = { (u64)buf, 8, 0, 0 };
    attack_chain(d, 2, &ev, 1, 0);
    attack_chain(d, 0, &ev, 1, 0);
    reset(d);
}

/* A seeded random mix over every device: random descriptors (anywhere,
 * any length and flags, `next` anywhere), random avail indices, random
 * register writes of any value, notifications. Block headers name only
 * the second half of the disk or sectors past its end. */
static void random_mix(u64 rounds)
{
    /* Zeros read as a header are a read of sector 0: the only writes a
     * stale descriptor can lead to are those of the header at buf. */
    memset_(buf, 0, sizeof buf);
    for (u64 r = 0; r < rounds; r++) {
        struct dev *d = &devs[below(ndevs)];
        if (below(8) == 0 || d->q[0].size == 0) {
            if (setup(d, below(4) ? d->features : rnd(), (u16)(below(3) == 0 ? below(70) : 0)))
                continue;
        }
        u32 qi = below(d->nq);
        struct queue *q = &d->q[qi];
        if (!q->size)
            continue;
        switch (below(6)) {
        case 0: case 1: case 2: {
            struct desc ds[6];
            int n = 1 + below(6);
            u64 addrs[] = { (u64)buf + below(sizeof buf), mmio_hole() + below(0x1000),
                            0x100000000000UL + below(1 << 20), 0xffffffffffffffffUL - below(64),
                            (u64)q->desc };
            u32 lens[] = { 0, 1, 16, 44, 512, 4096, 70000, 0xffffffff, (u32)below(8192) };
            for (int i = 0; i < n; i++) {
                ds[i].addr = addrs[below(5)];
                ds[i].len = lens[below(9)];
                ds[i].flags = (u16)below(8);
                ds[i].next = (u16)below(q->size + 2);
            }
            /* Block headers aimed at the scratch half or past the end. */
            if (d->id == ID_BLK) {
                struct blk_hdr *h = (struct blk_hdr *)buf;
                h->type = (u32)below(3) == 0 ? (u32)rnd() : (u32)below(2);
                h->sector = below(2) ? d->sectors / 2 + below(d->sectors / 2) : d->sectors + below(4);
                ds[0].addr = (u64)buf;
                ds[0].len = 16;
                ds[0].flags &= ~(F_WRITE | F_INDIRECT);
            }
            post(q, ds, n, (int)below(2));
            break;
        }
        case 3:
            q->avail[1] = (u16)rnd();
            break;
        case 4: {
            static const u32 regs[] = { QUEUE_SEL, QUEUE_NUM, QUEUE_READY, INT_ACK, DRV_FEAT_SEL,
                                        DRV_FEAT, QUEUE_DESC, QUEUE_AVAIL + 4, QUEUE_USED, STATUS };
            w32(d->base + regs[below(10)], (u32)rnd());
            break;
        }
        default:
            notify(d, below(4) ? qi : (u32)rnd());
        }
        if (below(4) == 0)
            notify(d, qi);
    }
    for (int i = 0; i < ndevs; i++)
        reset(&devs[i]);
}

/* ---- the checks ---- */

static void check_block(struct dev *d)
{
    if (setup(d, d->features & ~(1UL << 29 | 1UL << 28), 0)) {
        fail("block-setup-after-attacks", d->base);
        return;
    }
    u8 *data = buf + 0x10000, *back = buf + 0x20000;
    u64 sector = d->sectors / 2 + 8;
    for (u32 i = 0; i < 4096; i++)
        data[i] = (u8)(i * 31 + 7);
    int s = blk_rw(d, 1, sector, data, 4096);
    if (d->read_only) {
        if (s != 1) /* VIRTIO_BLK_S_IOERR */
            fail("read-only-disk-write-not-refused", (u64)s);
    } else if (s != 0) {
        fail("block-write-after-attacks", (u64)s);
    }
    memset_(back, 0, 4096);
    s = blk_rw(d, 0, d->read_only ? 0 : sector, back, 4096);
    if (s != 0)
        fail("block-read-after-attacks", (u64)s);
    else if (!d->read_only)
        for (u32 i = 0; i < 4096; i++)
            if (back[i] != data[i]) {
                fail("block-read-back-differs", i);
                break;
            }
    puts_("HOSTILE-CHECK block ");
    puthex(d->base);
    puts_(d->read_only ? " read-only" : " read-write");
    putc_('\n');
}

static void check_rng(struct dev *d)
{
    if (setup(d, d->features, 0)) {
        fail("rng-setup-after-attacks", d->base);
        return;
    }
    u8 *data = buf + 0x10000;
    memset_(data, 0, 64);
    struct desc one = { (u64)data, 64, F_WRITE, 0 };
    post(&d->q[0], &one, 1, 0);
    notify(d, 0);
    if (!wait_used(d, &d->q[0], 1, LONG)) {
        fail("rng-after-attacks", d->base);
        return;
    }
    u32 nonzero = 0;
    for (int i = 0; i < 64; i++)
        nonzero += data[i] != 0;
    if (nonzero < 32)
        fail("rng-bytes-not-random", nonzero);
    puts_("HOSTILE-CHECK rng\n");
}

static void check_net(struct dev *d)
{
    if (setup(d, 1UL << 32, 0)) { /* VERSION_1 only */
        fail("net-setup-after-attacks", d->base);
        return;
    }
    u8 *frame = buf + 0x10000;
    memset_(frame, 0, 12 + 60);
    for (int i = 0; i < 6; i++)
        frame[12 + i] = 0xff;
    frame[12 + 12] = 0x08;
    frame[12 + 13] = 0x06; /* ARP */
    struct desc tx = { (u64)frame, 12 + 60, 0, 0 };
    post(&d->q[1], &tx, 1, 0);
    notify(d, 1);
    if (!wait_used(d, &d->q[1], 1, LONG))
        fail("net-transmit-after-attacks", d->base);
    else
        puts_("HOSTILE-CHECK net\n");
}

static void check_vsock(struct dev *d)
{
    if (setup(d, d->features, 0)) {
        fail("vsock-setup-after-attacks", d->base);
        return;
    }
    /* A request to a host port nobody listens on: the device answers RST
     * on the receive queue. */
    u8 *rxb = buf + 0x20000;
    struct desc rx = { (u64)rxb, 4096, F_WRITE, 0 };
    post(&d->q[0], &rx, 1, 0);
    notify(d, 0);
    struct { u64 src_cid, dst_cid; u32 src_port, dst_port, len; u16 type, op; u32 flags, buf_alloc, fwd_cnt; }
        __attribute__((packed)) *h = (void *)(buf + 0x10000);
    memset_(h, 0, 44);
    h->src_cid = 3; h->dst_cid = 2; h->src_port = 5000; h->dst_port = 9; h->type = 1; h->op = 1;
    h->buf_alloc = 65536;
    struct desc tx = { (u64)h, 44, 0, 0 };
    post(&d->q[1], &tx, 1, 0);
    notify(d, 1);
    if (!wait_used(d, &d->q[0], 1, LONG)) {
        fail("vsock-no-answer-after-attacks", d->base);
        return;
    }
    u16 op = *(u16 *)(rxb + 30);
    if (op != 3) /* VIRTIO_VSOCK_OP_RST */
        fail("vsock-answer-not-rst", op);
    else
        puts_("HOSTILE-CHECK vsock\n");
}

/* ---- finding the devices ---- */

static u64 parse_hex(const char **s)
{
    u64 v = 0;
    if ((*s)[0] == '0' && ((*s)[1] == 'x' || (*s)[1] == 'X'))
        *s += 2;
    for (;; (*s)++) {
        char c = **s;
        if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
        else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v = v * 16 + (u64)(c - 'A' + 10);
        else return v;
    }
}

static u64 parse_dec(const char *s)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

static int starts(const char *s, const char *p)
{
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}

static u64 rounds = 2000;

static void find_devices(const char *cmdline)
{
    for (const char *s = cmdline; *s; s++) {
        if (s != cmdline && s[-1] != ' ')
            continue;
        if (starts(s, "hostile.seed="))
            seed = parse_dec(s + 13) | 1;
        if (starts(s, "hostile.rounds="))
            rounds = parse_dec(s + 15);
        if (!starts(s, "virtio_mmio.device=") || ndevs == MAXDEV)
            continue;
        const char *p = s + 19;
        while (*p && *p != '@')
            p++;
        if (*p != '@')
            continue;
        p++;
        u64 base = parse_hex(&p);
        if (base < 0xc0000000UL || base >= 0x100000000UL || r32(base + MAGIC) != 0x74726976 ||
            r32(base + VERSION) != 2)
            continue;
        struct dev *d = &devs[ndevs++];
        d->base = base;
        d->id = r32(base + DEVICE_ID);
        d->features = offered_features(d);
        d->nq = d->id == ID_NET ? 2 : d->id == ID_VSOCK ? 3 : 1;
        if (d->id == ID_BLK) {
            d->read_only = (d->features >> 5) & 1;
            d->sectors = r32(base + CONFIG) | (u64)r32(base + CONFIG + 4) << 32;
        }
    }
}

void main_(u64 boot_params)
{
    map_mmio();
    const char *cmdline = (const char *)(u64)*(u32 *)(boot_params + 0x228);
    puts_("HOSTILE-START\n");
    find_devices(cmdline);
    for (int i = 0; i < ndevs; i++) {
        puts_("HOSTILE-DEVICE id=");
        putn(devs[i].id);
        puts_(" base=");
        puthex(devs[i].base);
        puts_(" features=");
        puthex(devs[i].features);
        if (devs[i].id == ID_BLK) {
            puts_(" sectors=");
            putn(devs[i].sectors);
        }
        putc_('\n');
    }
    for (int i = 0; i < ndevs; i++) {
        struct dev *d = &devs[i];
        attacks_common(d);
        if (d->id == ID_BLK)
            attacks_block(d);
        if (d->id == ID_NET)
            attacks_net(d);
        if (d->id == ID_VSOCK)
            attacks_vsock(d);
        puts_("HOSTILE-ATTACKED id=");
        putn(d->id);
        putc_('\n');
    }
    puts_("HOSTILE-RANDOM rounds=");
    putn(rounds);
    puts_(" seed=");
    putn(seed);
    putc_('\n');
    random_mix(rounds);
    for (int i = 0; i < ndevs; i++) {
        struct dev *d = &devs[i];
        if (d->id == ID_BLK) check_block(d);
        if (d->id == ID_RNG) check_rng(d);
        if (d->id == ID_NET) check_net(d);
        if (d->id == ID_VSOCK) check_vsock(d);
        reset(d);
    }
    puts_("HOSTILE-DONE fails=");
    putn(fails);
    putc_('\n');
    /* Idle until the host has measured moat and types a byte. */
    puts_("HOSTILE-IDLE\n");
    while (!(inb(0x3fd) & 1))
        for (int i = 0; i < 100000; i++)
            pause();
    puts_("HOSTILE-RESET\n");
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("hlt");
}

/* pushsection/popsection: the compiler emits functions after this too. */
__asm__(".pushsection .text.start, \"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "  cli\n"
        "  lea stack_top(%rip), %rsp\n"
        "  mov %rsi, %rdi\n"
        "  call main_\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".popsection\n"
        ".pushsection .bss\n"
        ".align 16\n"
        "  .skip 65536\n"
        "stack_top:\n"
        ".popsection\n");
