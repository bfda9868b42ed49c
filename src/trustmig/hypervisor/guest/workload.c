/*
 * tm-workload: the guest side of trustmig's migration checks.
 *
 * A migrated guest must come out the other side with every byte of its memory intact and with a
 * measurable pause.  This program makes both observable from the serial console:
 *
 *   - a heartbeat process prints "HB <seq> <guest-monotonic-ns>" every hb_ms ms, so the host can
 *     measure the pause the guest really felt (QEMU's own downtime figure understates it);
 *   - mem_mib MiB of self-describing pages: each 4 KiB page starts with (index, generation) and
 *     the rest is a pseudo-random function of both, so any page can be verified on its own, even
 *     while a dirtier keeps rewriting pages at dirty_rate MiB/s to keep pre-copy busy;
 *   - marker_pages pages that start with a secret marker in plaintext.  The program keeps only an
 *     XOR-encoded reference, so a man in the middle who rewrites every plaintext occurrence in the
 *     migration stream cannot also rewrite what the pages are compared against.
 *
 * Commands arrive one per line on stdin (the serial console): check, pause, resume, rate <R>,
 * secret.  Every output line is emitted with a single write() so lines from the heartbeat process
 * and the threads below never interleave on the tty.
 *
 * usage: tm-workload [mem_mib=N] [dirty_rate=R] [hb_ms=N] [secret_hex=HEX] [marker_pages=N]
 * build: gcc -static -O2 -pthread -o tm-workload workload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAX_SECRET 256
#define LINE_MAX_LEN 128

/* hex of "TRUSTMIG-SECRET-MARKER-7f3a9c": kept hex-encoded so the plaintext never sits in the binary */
#define DEFAULT_SECRET_HEX "54525553544d49472d5345435245542d4d41524b45522d376633613963"

#define PATTERN_SALT 0x74727573746d6967ULL /* "trustmig" */
#define MARKER_SALT 0x6d61726b65727321ULL  /* "markers!" */

struct config {
    long mem_mib;
    double dirty_rate;
    long hb_ms;
    long marker_pages;
    const char *secret_hex;
    long serve_port; /* 0: no service */
};

/* ---- output ------------------------------------------------------------------------------- */

/* One formatted line, one write(): the tty serialises whole writes, so lines never interleave. */
static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(1, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        off += w;
    }
}

static void fatal(const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    say("FATAL %s", msg);
    exit(2);
}

static uint64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

/* ---- argument parsing ---------------------------------------------------------------------- */

static long parse_long(const char *key, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        fatal("bad tm.%s=%s: expected an integer in [%ld, %ld]", key, v, lo, hi);
    return x;
}

static double parse_rate(const char *v, int *ok) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    *ok = !(errno || end == v || *end || !isfinite(x) || x < 0 || x > 1e6);
    return x;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void parse_args(int argc, char **argv, struct config *cfg) {
    cfg->mem_mib = 64;
    cfg->dirty_rate = 0;
    cfg->hb_ms = 10;
    cfg->marker_pages = 64;
    cfg->secret_hex = DEFAULT_SECRET_HEX;
    cfg->serve_port = 0;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) fatal("bad argument %s: expected key=value", argv[i]);
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        if (!strcmp(k, "mem_mib")) cfg->mem_mib = parse_long(k, v, 0, 1 << 20);
        else if (!strcmp(k, "hb_ms")) cfg->hb_ms = parse_long(k, v, 1, 60000);
        else if (!strcmp(k, "marker_pages")) cfg->marker_pages = parse_long(k, v, 1, 1 << 16);
        else if (!strcmp(k, "dirty_rate")) {
            int ok;
            cfg->dirty_rate = parse_rate(v, &ok);
            if (!ok) fatal("bad tm.dirty_rate=%s: expected MiB/s as a number >= 0", v);
        } else if (!strcmp(k, "secret_hex")) cfg->secret_hex = v;
        else if (!strcmp(k, "serve")) cfg->serve_port = parse_long(k, v, 1, 65535);
        else fatal("unknown argument %s: use mem_mib, dirty_rate, hb_ms, secret_hex, marker_pages, serve", k);
    }
    size_t n = strlen(cfg->secret_hex);
    if (n == 0 || n % 2 || n / 2 > MAX_SECRET)
        fatal("bad tm.secret_hex: expected 2..%d hex digits, an even count", 2 * MAX_SECRET);
    for (size_t i = 0; i < n; i++)
        if (hexval(cfg->secret_hex[i]) < 0) fatal("bad tm.secret_hex: '%c' is not a hex digit", cfg->secret_hex[i]);
}

/* ---- heartbeat (own process) --------------------------------------------------------------- */

/* A separate process with a real-time priority: a long check or a busy dirtier in the main
 * process can never delay a heartbeat, so heartbeat gaps measure only the migration pause. */
static void heartbeat_loop(long period_ms) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct sched_param sp = {.sched_priority = 10};
    sched_setscheduler(0, SCHED_FIFO, &sp); /* best effort */
    const uint64_t period = (uint64_t)period_ms * 1000000ULL;
    uint64_t next = mono_ns();
    for (unsigned long long seq = 0;; seq++) {
        say("HB %llu %llu", seq, (unsigned long long)mono_ns());
        next += period;
        uint64_t now = mono_ns();
        if (next < now) next = now + period; /* after a pause: no burst of catch-up beats */
        struct timespec ts = {.tv_sec = (time_t)(next / 1000000000ULL),
                              .tv_nsec = (long)(next % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
    }
}

/* ---- patterned pages ----------------------------------------------------------------------- */

static inline uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t page_seed(uint64_t idx, uint64_t gen, uint64_t salt) {
    return (idx * 0xD1B54A32D192ED03ULL) ^ ((gen + 1) * 0xABC98388FB8FAC03ULL) ^ salt;
}

/* The body is written before the header, so a page caught mid-rewrite by a migration snapshot is
 * finished by the same loop on the destination. */
static void fill_page(uint64_t *p, uint64_t idx, uint64_t gen) {
    uint64_t s = page_seed(idx, gen, PATTERN_SALT);
    for (int i = 2; i < WORDS; i++) p[i] = splitmix(&s);
    p[0] = idx;
    p[1] = gen;
}

static int page_ok(const uint64_t *p, uint64_t idx) {
    if (p[0] != idx) return 0;
    uint64_t s = page_seed(idx, p[1], PATTERN_SALT);
    for (int i = 2; i < WORDS; i++)
        if (p[i] != splitmix(&s)) return 0;
    return 1;
}

static inline uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *b = data;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001B3ULL;
    }
    return h;
}

/* ---- shared state -------------------------------------------------------------------------- */

static struct config cfg;
static uint64_t *pages;   /* mem_mib * 256 pattern pages */
static size_t npages;
static unsigned char *markers; /* marker_pages pages, each starting with the secret */
static size_t secret_len;
static unsigned char secret_ref[MAX_SECRET]; /* secret XOR key: the only reference copy */
static unsigned char xor_key[32];

/* Held by the dirtier for each batch and by `check` for a whole scan: taking it pauses dirtying. */
static pthread_mutex_t pages_lock = PTHREAD_MUTEX_INITIALIZER;
/* Protects paused/rate; the dirtier re-reads them every tick. */
static pthread_mutex_t ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static int paused;
static double rate_mib;
static unsigned long ctl_epoch; /* bumped on every pause/resume/rate change */

/* ---- markers ------------------------------------------------------------------------------- */

static size_t secret_words(void) { return (secret_len + 7) / 8; }

/* Word w of marker page m: the secret's words are replaced by secret bytes then zero padding. */
static void fill_marker(size_t m) {
    unsigned char *p = markers + m * PAGE;
    uint64_t s = page_seed(m, 0, MARKER_SALT);
    for (int i = 0; i < WORDS; i++) ((uint64_t *)p)[i] = splitmix(&s);
    memset(p, 0, secret_words() * 8);
    for (size_t j = 0; j < secret_len; j++) p[j] = secret_ref[j] ^ xor_key[j % sizeof xor_key];
}

static int marker_ok(size_t m) {
    const unsigned char *p = markers + m * PAGE;
    for (size_t j = 0; j < secret_len; j++)
        if ((unsigned char)(p[j] ^ xor_key[j % sizeof xor_key]) != secret_ref[j]) return 0;
    for (size_t j = secret_len; j < secret_words() * 8; j++)
        if (p[j]) return 0;
    uint64_t s = page_seed(m, 0, MARKER_SALT);
    for (size_t i = 0; i < WORDS; i++) {
        uint64_t v = splitmix(&s);
        if (i >= secret_words() && ((const uint64_t *)p)[i] != v) return 0;
    }
    return 1;
}

static size_t markers_intact(void) {
    size_t ok = 0;
    for (size_t m = 0; m < (size_t)cfg.marker_pages; m++) ok += (size_t)marker_ok(m);
    return ok;
}

static void setup_secret(void) {
    if (getrandom(xor_key, sizeof xor_key, GRND_NONBLOCK) != (ssize_t)sizeof xor_key) {
        uint64_t s = mono_ns() ^ ((uint64_t)getpid() << 32);
        for (size_t i = 0; i < sizeof xor_key; i++) xor_key[i] = (unsigned char)splitmix(&s);
    }
    /* Decode straight into the encoded form: the plaintext only ever exists in registers and in
     * the marker pages themselves. */
    secret_len = strlen(cfg.secret_hex) / 2;
    for (size_t j = 0; j < secret_len; j++) {
        int b = hexval(cfg.secret_hex[2 * j]) << 4 | hexval(cfg.secret_hex[2 * j + 1]);
        secret_ref[j] = (unsigned char)b ^ xor_key[j % sizeof xor_key];
    }
}

/* ---- threads ------------------------------------------------------------------------------- */

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

/* Rewrites pages round-robin at rate_mib MiB/s.  Each rewrite bumps the page's generation and
 * regenerates the whole page, so every byte is dirtied and the page stays self-consistent. */
static void *dirtier(void *arg) {
    (void)arg;
    size_t cursor = 0;
    unsigned long seen_epoch = ~0UL;
    uint64_t base_ns = 0;
    double done = 0;
    for (;;) {
        sleep_ms(10);
        pthread_mutex_lock(&ctl_lock);
        int p = paused;
        double rate = rate_mib;
        unsigned long epoch = ctl_epoch;
        pthread_mutex_unlock(&ctl_lock);
        uint64_t now = mono_ns();
        if (epoch != seen_epoch) {
            seen_epoch = epoch;
            base_ns = now;
            done = 0;
        }
        if (p || rate <= 0 || npages == 0) {
            base_ns = now;
            done = 0;
            continue;
        }
        double pages_per_s = rate * 256.0;
        double due = (double)(now - base_ns) / 1e9 * pages_per_s - done;
        if (due > pages_per_s) { /* more than a second behind (guest was stopped): start over */
            base_ns = now;
            done = 0;
            continue;
        }
        size_t n = (size_t)due;
        if (n == 0) continue;
        pthread_mutex_lock(&pages_lock);
        for (size_t i = 0; i < n; i++) {
            uint64_t *pg = pages + cursor * WORDS;
            fill_page(pg, cursor, pg[1] + 1);
            cursor = (cursor + 1) % npages;
        }
        pthread_mutex_unlock(&pages_lock);
        done += (double)n;
    }
    return NULL;
}

/* Reports the first (and every later) change of the number of broken marker pages. */
static void *marker_checker(void *arg) {
    (void)arg;
    size_t total = (size_t)cfg.marker_pages, last_bad = 0;
    for (;;) {
        sleep_ms(500);
        size_t bad = total - markers_intact();
        if (bad != last_bad && bad > 0) say("MARKER_MISMATCH bad=%zu/%zu", bad, total);
        last_bad = bad;
    }
    return NULL;
}

/* ---- network: a service that gives its secret away, and a probe ---------------------------- */

/* tm.serve=PORT: every connection gets "TMSERVICE <secret hex>" padded to 1 KiB, then EOF. It is
 * the victim's open port of the inter-VM attack: what a neighbour reads from it is what leaked. */
static void *service(void *arg) {
    (void)arg;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.serve_port)};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) {
        say("ERR service on port %ld: %s", cfg.serve_port, strerror(errno));
        return NULL;
    }
    say("SERVING port=%ld", cfg.serve_port);
    char banner[1024];
    memset(banner, '.', sizeof banner);
    int n = snprintf(banner, sizeof banner, "TMSERVICE %s ", cfg.secret_hex);
    if (n > 0 && (size_t)n < sizeof banner) banner[n] = '.';
    banner[sizeof banner - 1] = '\n';
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        ssize_t w = write(c, banner, sizeof banner);
        (void)w;
        close(c);
    }
    return NULL;
}

/* connect A.B.C.D PORT: "NET <addr>:<port> ok bytes=<n>" (what came back within 2 s), or
 * refused / timeout (no answer within 3 s) / error <reason>. */
static void cmd_connect(const char *args) {
    char ip[64];
    long port = 0;
    if (sscanf(args, "%63s %ld", ip, &port) != 2 || port < 1 || port > 65535) {
        say("ERR connect: expected an IPv4 address and a port");
        return;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        say("ERR connect: %s is not an IPv4 address", ip);
        return;
    }
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s < 0) {
        say("NET %s:%ld error %s", ip, port, strerror(errno));
        return;
    }
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    if (r && errno == EINPROGRESS) {
        struct pollfd p = {.fd = s, .events = POLLOUT};
        r = poll(&p, 1, 3000);
        if (r == 0) {
            say("NET %s:%ld timeout", ip, port);
            close(s);
            return;
        }
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
        r = err ? -1 : 0;
        errno = err;
    }
    if (r) {
        if (errno == ECONNREFUSED) say("NET %s:%ld refused", ip, port);
        else if (errno == EHOSTUNREACH || errno == ENETUNREACH) say("NET %s:%ld unreachable", ip, port);
        else say("NET %s:%ld error %s", ip, port, strerror(errno));
        close(s);
        return;
    }
    long total = 0;
    char buf[4096];
    for (;;) {
        struct pollfd p = {.fd = s, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0) break;
        ssize_t n = read(s, buf, sizeof buf);
        if (n <= 0) break;
        total += n;
    }
    close(s);
    say("NET %s:%ld ok bytes=%ld", ip, port, total);
}

/* ---- commands ------------------------------------------------------------------------------ */

static void cmd_check(void) {
    size_t bad = 0;
    long long first_bad = -1;
    uint64_t h = 0xCBF29CE484222325ULL;
    pthread_mutex_lock(&pages_lock);
    for (size_t i = 0; i < npages; i++) {
        const uint64_t *pg = pages + i * WORDS;
        if (!page_ok(pg, i)) {
            bad++;
            if (first_bad < 0) first_bad = (long long)i;
        }
        h = fnv1a(h, pg, 16);
    }
    pthread_mutex_unlock(&pages_lock);
    size_t ok = markers_intact();
    h = fnv1a(h, markers, (size_t)cfg.marker_pages * PAGE);
    say("CHECK pages=%zu bad_pages=%zu first_bad=%lld marker_ok=%zu/%ld digest=%016llx", npages, bad,
        first_bad, ok, cfg.marker_pages, (unsigned long long)h);
}

static void set_control(int new_paused, double new_rate) {
    pthread_mutex_lock(&ctl_lock);
    if (new_paused >= 0) paused = new_paused;
    if (new_rate >= 0) rate_mib = new_rate;
    ctl_epoch++;
    pthread_mutex_unlock(&ctl_lock);
}

static void handle(char *line) {
    while (*line == ' ' || *line == '\t') line++;
    size_t n = strlen(line);
    while (n && (line[n - 1] == ' ' || line[n - 1] == '\t')) line[--n] = 0;
    if (!n) return;
    if (!strcmp(line, "check")) cmd_check();
    else if (!strcmp(line, "pause")) {
        set_control(1, -1);
        say("PAUSED");
    } else if (!strcmp(line, "resume")) {
        set_control(0, -1);
        say("RESUMED");
    } else if (!strncmp(line, "rate ", 5)) {
        int ok;
        const char *v = line + 5;
        while (*v == ' ') v++;
        double r = parse_rate(v, &ok);
        if (!ok) {
            say("ERR bad rate: expected MiB/s as a number >= 0");
            return;
        }
        set_control(-1, r);
        say("RATE %g", r);
    } else if (!strncmp(line, "connect ", 8)) cmd_connect(line + 8);
    else if (!strcmp(line, "secret")) say("SECRET_AT 0x%lx", (unsigned long)(uintptr_t)markers);
    else say("ERR unknown command");
}

/* Raw, no-echo console: commands must not be echoed back into the output protocol. */
static void raw_console(void) {
    struct termios t;
    if (!isatty(0) || tcgetattr(0, &t)) return;
    t.c_iflag &= ~(tcflag_t)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON | IXOFF);
    t.c_oflag &= ~(tcflag_t)OPOST;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t.c_cflag &= ~(tcflag_t)(CSIZE | PARENB);
    t.c_cflag |= CS8;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    tcsetattr(0, TCSANOW, &t);
}

static void command_loop(void) {
    char line[LINE_MAX_LEN];
    size_t len = 0;
    int overflow = 0;
    char buf[256];
    for (;;) {
        ssize_t r = read(0, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return; /* no console input: keep running without commands */
        for (ssize_t i = 0; i < r; i++) {
            char c = buf[i];
            if (c == '\n' || c == '\r') {
                if (overflow) say("ERR line too long");
                else if (len) {
                    line[len] = 0;
                    handle(line);
                }
                len = 0;
                overflow = 0;
            } else if (len + 1 < sizeof line) line[len++] = c;
            else overflow = 1;
        }
    }
}

/* ---- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    parse_args(argc, argv, &cfg);
    raw_console();

    pid_t hb = fork();
    if (hb == 0) heartbeat_loop(cfg.hb_ms);
    if (hb < 0) fatal("fork of the heartbeat process failed: %s", strerror(errno));

    setup_secret();
    markers = mmap(NULL, (size_t)cfg.marker_pages * PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (markers == MAP_FAILED)
        fatal("mmap of %ld marker pages failed: give the guest more memory", cfg.marker_pages);
    for (size_t m = 0; m < (size_t)cfg.marker_pages; m++) fill_marker(m);

    npages = (size_t)cfg.mem_mib * 256;
    if (npages) {
        pages = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (pages == MAP_FAILED)
            fatal("mmap of %ld MiB failed: give the guest more memory or lower tm.mem_mib", cfg.mem_mib);
        for (size_t i = 0; i < npages; i++) fill_page(pages + i * WORDS, i, 0);
    }
    rate_mib = cfg.dirty_rate;

    pthread_t t;
    if (pthread_create(&t, NULL, dirtier, NULL) || pthread_create(&t, NULL, marker_checker, NULL))
        fatal("cannot start worker threads");
    if (cfg.serve_port && pthread_create(&t, NULL, service, NULL)) fatal("cannot start the service");
    say("READY mem_mib=%ld marker_pages=%ld", cfg.mem_mib, cfg.marker_pages);
    command_loop();
    for (;;) pause();
}
