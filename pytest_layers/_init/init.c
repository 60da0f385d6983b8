/* The sandbox's compiled init: the same work as pytest_layers/sandbox.py's Python init, without
 * forking the caller's interpreter. pytest_layers/_cinit.py builds it and pytest_layers/sandbox.py
 * starts it; the protocol below is the one description of what passes between them.
 *
 * PROTOCOL (version "pytest-layers-init/2")
 *
 *   init --version            prints "pytest-layers-init/2\n" and exits 0 (the build's check)
 *   init --check              the same after a trial clone3 into the namespaces; when refused,
 *                             prints "clone3: WHY" and exits 126
 *
 *   init pytest-layers-init/2 ROOT HOSTNAME NETWORK CWD ROOTCALLER USER USERHINT NBINDS
 *        [SOURCE TARGET MODE]*NBINDS SEARCHPATH -- PROGRAM [ARG...]
 *
 *     ROOT        the directory that becomes "/" (absolute)
 *     HOSTNAME    the UTS name inside
 *     NETWORK     "none" (own network namespace, lo up) or "host"
 *     CWD         the program's working directory, resolved inside after pivot_root
 *     ROOTCALLER  "1" when the caller is root (its supplementary groups are dropped), else "0"
 *     USER        "" (uid 0 inside) or "UID:GID", the ids inside to run the program as
 *     USERHINT    the error text when switching to USER fails with EINVAL (the caller knows
 *                 which ids exist inside); "" for the plain message
 *     NBINDS      decimal count of the triples that follow
 *     SOURCE TARGET MODE   a host path, its target inside, MODE "ro"|"rw" then "d"|"f"
 *                 (directory or file), e.g. "rod"
 *     SEARCHPATH  the PATH the program is looked up in (its own PATH, or the default)
 *
 *   The starter's own environment is empty and init ignores it: the program's environment
 *   travels on fd 8, so that nothing in it (LD_PRELOAD, LD_LIBRARY_PATH, GLIBC_TUNABLES...)
 *   reaches the host's dynamic loader, which runs as the caller before any namespace exists;
 *   and not in argv, which every user may read in /proc/PID/cmdline.
 *   File descriptors: 0-2 the program's stdio (a closed one stays closed), and
 *     3 err (write end): "CODE:TEXT" (errno and one line) when the sandbox cannot be set up or
 *       the program not started; closed without a word once the program runs
 *     4 status (write end): the program's exit status in decimal, -N for signal N
 *     5 go (read end): the caller writes "1" once it wrote init's uid and gid maps, or "0WHY"
 *     6 pid (write end): the starter writes init's pid in decimal and a newline
 *     7 a pidfd of the caller, opened by the caller before it started us (init keeps it until
 *       it switched to USER: that clears the parent-death signal, which init then sets again)
 *     8 the program's environment, "NAME=VALUE\0" entries up to its end (a memfd)
 *   Every other fd is closed. SIGINT and SIGQUIT arrive blocked.
 *
 *   The process the caller starts (the starter) clone3()s init straight into new user, mount,
 *   PID, UTS, IPC, cgroup (and network) namespaces with CLONE_PARENT, so init is the caller's
 *   child, writes its pid on fd 6 and exits 0. Exit status 126: clone3 was refused (CODE:TEXT
 *   on fd 3 says why; the caller may fall back to its Python init); 125: any other failure.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/sched.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "pytest-layers-init/2"
#define FD_ERR 3
#define FD_STATUS 4
#define FD_GO 5
#define FD_PID 6
#define FD_CALLER 7
#define FD_ENV 8
#define FIRST_FREE_FD 9
#define EXIT_FAILED 125
#define EXIT_CLONE_REFUSED 126
#define DEFAULT_CAP_LAST 40
#define MAX_SYMLINKS 40
#define MSG_MAX 4096

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

struct bind {
    const char *source;
    const char *target;
    int readonly;
    int directory;
};

struct plan {
    const char *root;
    const char *hostname;
    int own_network;
    const char *cwd;
    int root_caller;
    int switch_user;
    uid_t uid;
    gid_t gid;
    const char *user_hint;
    size_t nbinds;
    struct bind *binds;
    const char *search_path;
    char **envp;
    char **argv;
    int cap_last;
};

static volatile sig_atomic_t program_pid;

/* "CODE:TEXT" on the err pipe, then exit: the caller turns it into a SandboxError. */
static void __attribute__((noreturn, format(printf, 2, 3))) fail(int code, const char *fmt, ...)
{
    char text[MSG_MAX];
    char line[MSG_MAX + 16];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0)
        snprintf(text, sizeof text, "sandbox: cannot describe the failure");
    n = snprintf(line, sizeof line, "%d:%s", code, text);
    if (n > 0) {
        size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
        /* Nothing to do if this fails: the caller then sees our exit status alone. */
        if (write(FD_ERR, line, len) < 0)
            _exit(EXIT_FAILED);
    }
    _exit(EXIT_FAILED);
}

static int parse_id(const char *s, const char **end, unsigned long *out)
{
    char *e;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long v = strtoul(s, &e, 10);
    if (errno || v > UINT32_MAX)
        return -1;
    *out = v;
    *end = e;
    return 0;
}

static int read_cap_last(void)
{
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return DEFAULT_CAP_LAST;
    char buf[16];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return DEFAULT_CAP_LAST;
    buf[n] = '\0';
    const char *end;
    unsigned long v;
    if (parse_id(buf, &end, &v) || v > 63)
        return DEFAULT_CAP_LAST;
    return (int)v;
}

static void parse(int argc, char **argv, struct plan *p)
{
    /* argv[1] is the version, checked by main; 8 fixed fields, the binds, the PATH, "--". */
    if (argc < 12)
        fail(EINVAL, "sandbox init: too few arguments");
    p->root = argv[2];
    p->hostname = argv[3];
    if (strcmp(argv[4], "none") == 0)
        p->own_network = 1;
    else if (strcmp(argv[4], "host") == 0)
        p->own_network = 0;
    else
        fail(EINVAL, "sandbox init: network %.64s", argv[4]);
    p->cwd = argv[5];
    p->root_caller = strcmp(argv[6], "1") == 0;
    p->switch_user = argv[7][0] != '\0';
    if (p->switch_user) {
        const char *end;
        unsigned long uid, gid;
        if (parse_id(argv[7], &end, &uid) || *end != ':' || parse_id(end + 1, &end, &gid) ||
            *end != '\0')
            fail(EINVAL, "sandbox init: user %.64s", argv[7]);
        /* (uid_t)-1 means "unchanged" to setresuid: the program would stay uid 0. */
        if (uid >= UINT32_MAX || gid >= UINT32_MAX)
            fail(EINVAL, "sandbox init: user %.64s: ids go up to 4294967294", argv[7]);
        p->uid = (uid_t)uid;
        p->gid = (gid_t)gid;
    }
    p->user_hint = argv[8];
    const char *end;
    unsigned long n;
    if (parse_id(argv[9], &end, &n) || *end != '\0' || n > (unsigned long)(argc - 12) / 3)
        fail(EINVAL, "sandbox init: bind count %.64s", argv[9]);
    p->nbinds = n;
    p->binds = calloc(n ? n : 1, sizeof *p->binds);
    if (p->binds == NULL)
        fail(ENOMEM, "sandbox init: out of memory");
    int i = 10;
    for (size_t b = 0; b < n; b++, i += 3) {
        const char *mode = argv[i + 2];
        if (strlen(mode) != 3 || (strncmp(mode, "ro", 2) && strncmp(mode, "rw", 2)) ||
            (mode[2] != 'd' && mode[2] != 'f'))
            fail(EINVAL, "sandbox init: bind mode %.64s", mode);
        p->binds[b] = (struct bind){argv[i], argv[i + 1], mode[1] == 'o', mode[2] == 'd'};
    }
    if (i + 2 >= argc || strcmp(argv[i + 1], "--") != 0)
        fail(EINVAL, "sandbox init: no program after the plan");
    p->search_path = argv[i];
    p->argv = &argv[i + 2];
}

/* The program's environment from FD_ENV: NUL-terminated "NAME=VALUE" entries. */
static void read_env(struct plan *p)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (buf == NULL)
            fail(ENOMEM, "sandbox init: out of memory");
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            continue;
        }
        ssize_t n = read(FD_ENV, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail(errno, "sandbox init: cannot read the environment: %s", strerror(errno));
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(FD_ENV);
    if (len > 0 && buf[len - 1] != '\0')
        fail(EINVAL, "sandbox init: the environment does not end with a NUL");
    size_t count = 0;
    for (size_t i = 0; i < len; i++)
        count += buf[i] == '\0';
    p->envp = calloc(count + 1, sizeof *p->envp);
    if (p->envp == NULL)
        fail(ENOMEM, "sandbox init: out of memory");
    for (size_t i = 0, e = 0; i < len; i += strlen(buf + i) + 1, e++) {
        if (strchr(buf + i, '=') == NULL)
            fail(EINVAL, "sandbox init: environment entry %.64s", buf + i);
        p->envp[e] = buf + i;
    }
}

/* Close every fd from `first` on, or (cloexec) mark them close-on-exec. */
static void fds_from(unsigned int first, int cloexec)
{
    if (syscall(SYS_close_range, first, ~0U, cloexec ? CLOSE_RANGE_CLOEXEC : 0) == 0)
        return;
    /* No close_range (Linux < 5.9, or filtered): one call per open fd. */
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        fail(errno, "sandbox init: cannot list its fds: %s", strerror(errno));
    int own = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *end;
        unsigned long fd;
        if (parse_id(e->d_name, &end, &fd) || *end != '\0')
            continue;
        if (fd < first || (int)fd == own)
            continue;
        if (!cloexec)
            close((int)fd);
        else if (fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0)
            fail(errno, "sandbox init: cannot mark fd %lu close-on-exec: %s", fd,
                 strerror(errno));
    }
    closedir(d);
}

/* ---- init's work, in the order the Python init does it ---------------------------------- */

static int open_in_root(int root_fd, const char *path, int flags)
{
    struct open_how how = {
        .flags = (uint64_t)(flags | O_CLOEXEC),
        .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, root_fd, path, &how, sizeof how);
}

static int setattr(int dirfd_, const char *path, uint64_t set)
{
    struct mount_attr attr = {.attr_set = set};
    return (int)syscall(SYS_mount_setattr, dirfd_, path, AT_RECURSIVE, &attr, sizeof attr);
}

/* "/proc/self/fd/N[/name]": mount(2) follows it to the very inode the fd holds. */
static int at(char *buf, size_t size, int fd, const char *name)
{
    int n = name ? snprintf(buf, size, "/proc/self/fd/%d/%s", fd, name)
                 : snprintf(buf, size, "/proc/self/fd/%d", fd);
    if (n < 0 || (size_t)n >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

/* mkdir -p (or touch) rel inside the root; a dangling symlink on the way gets its target made,
 * resolved inside the root as well. */
static int make_inside(int root_fd, const char *rel, int directory, int hops)
{
    if (hops > MAX_SYMLINKS) {
        errno = ELOOP;
        return -1;
    }
    char path[PATH_MAX];
    size_t len = strlen(rel);
    if (len >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(path, rel, len + 1);
    char prefix[PATH_MAX] = "";
    size_t plen = 0;
    char *save = NULL;
    for (char *name = strtok_r(path, "/", &save); name; name = strtok_r(NULL, "/", &save)) {
        if (strcmp(name, ".") == 0)
            continue;
        int last = 1;
        for (const char *rest = save; rest && *rest; rest++)
            if (*rest != '/') {
                last = 0;
                break;
            }
        size_t nlen = strlen(name);
        if (plen + nlen + 2 > sizeof prefix) {
            errno = ENAMETOOLONG;
            return -1;
        }
        char parent[PATH_MAX];
        memcpy(parent, plen ? prefix : ".", plen ? plen + 1 : 2);
        if (plen)
            prefix[plen++] = '/';
        memcpy(prefix + plen, name, nlen + 1);
        plen += nlen;
        int fd = open_in_root(root_fd, prefix, O_PATH);
        if (fd >= 0) {
            close(fd);
            continue;
        }
        if (errno != ENOENT)
            return -1;
        int pfd = open_in_root(root_fd, parent, O_PATH);
        if (pfd < 0)
            return -1;
        int rc;
        if (directory || !last) {
            rc = mkdirat(pfd, name, 0755);
        } else {
            rc = openat(pfd, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
            if (rc >= 0)
                rc = close(rc);
        }
        if (rc < 0 && errno == EEXIST) {
            char target[PATH_MAX];
            ssize_t n = readlinkat(pfd, name, target, sizeof target - 1);
            if (n < 0) {
                close(pfd);
                return -1;
            }
            target[n] = '\0';
            char next[PATH_MAX];
            int m = target[0] == '/' ? snprintf(next, sizeof next, "%s", target)
                                     : snprintf(next, sizeof next, "%s/%s", parent, target);
            if (m < 0 || (size_t)m >= sizeof next) {
                close(pfd);
                errno = ENAMETOOLONG;
                return -1;
            }
            rc = make_inside(root_fd, next, directory || !last, hops + 1);
        }
        int saved = errno;
        close(pfd);
        errno = saved;
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* An O_PATH fd of rel resolved inside the root, made when missing. */
static int inside(int root_fd, const char *rel, int directory)
{
    int flags = O_PATH | (directory ? O_DIRECTORY : 0);
    int fd = open_in_root(root_fd, rel, flags);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    if (make_inside(root_fd, rel, directory, 0) < 0)
        return -1;
    return open_in_root(root_fd, rel, flags);
}

static const char *const devices[] = {"null", "zero", "full", "random", "urandom", "tty"};

static int build_dev(int root_fd)
{
    char buf[64], src[32];
    int fd = inside(root_fd, "dev", 1);
    if (fd < 0 || at(buf, sizeof buf, fd, NULL) < 0)
        return -1;
    int rc = mount("tmpfs", buf, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m");
    close(fd);
    if (rc < 0)
        return -1;
    int dev = open_in_root(root_fd, "dev", O_RDONLY | O_DIRECTORY);
    if (dev < 0)
        return -1;
    /* The tmpfs is ours and fresh: names in it are used as they are. */
    for (size_t i = 0; i < sizeof devices / sizeof *devices; i++) {
        snprintf(src, sizeof src, "/dev/%s", devices[i]);
        if (mknodat(dev, devices[i], S_IFREG | 0666, 0) < 0 ||
            at(buf, sizeof buf, dev, devices[i]) < 0 || mount(src, buf, NULL, MS_BIND, NULL) < 0)
            goto fail;
    }
    /* A bind starts with no flags of its own: one recursive call gives all six (and the tmpfs)
     * nosuid,noexec, before pts and shm get their own flags. */
    if (at(buf, sizeof buf, dev, NULL) < 0 ||
        setattr(AT_FDCWD, buf, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC) < 0 ||
        mkdirat(dev, "pts", 0755) < 0 || mkdirat(dev, "shm", 0755) < 0 ||
        at(buf, sizeof buf, dev, "pts") < 0 ||
        mount("devpts", buf, "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620") < 0 ||
        at(buf, sizeof buf, dev, "shm") < 0 ||
        mount("shm", buf, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m") < 0 ||
        symlinkat("pts/ptmx", dev, "ptmx") < 0 || symlinkat("/proc/self/fd", dev, "fd") < 0 ||
        symlinkat("/proc/self/fd/0", dev, "stdin") < 0 ||
        symlinkat("/proc/self/fd/1", dev, "stdout") < 0 ||
        symlinkat("/proc/self/fd/2", dev, "stderr") < 0)
        goto fail;
    close(dev);
    return 0;
fail:;
    int saved = errno;
    close(dev);
    errno = saved;
    return -1;
}

/* Docker's lists (moby oci/defaults.go), as the Python init has them. */
static const char *const proc_readonly[] = {"bus", "fs", "irq", "sys", "sysrq-trigger"};
static const char *const proc_masked_files[] = {"kcore",       "keys",         "latency_stats",
                                                "timer_list",  "timer_stats", "sched_debug"};
static const char *const proc_masked_dirs[] = {"acpi", "asound", "scsi"};

static int protect_proc(void)
{
    char path[64];
    struct stat st;
    for (size_t i = 0; i < sizeof proc_readonly / sizeof *proc_readonly; i++) {
        snprintf(path, sizeof path, "/proc/%s", proc_readonly[i]);
        if (lstat(path, &st) < 0)
            continue;
        if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0 ||
            setattr(AT_FDCWD, path, MOUNT_ATTR_RDONLY) < 0)
            return -1;
    }
    for (size_t i = 0; i < sizeof proc_masked_files / sizeof *proc_masked_files; i++) {
        snprintf(path, sizeof path, "/proc/%s", proc_masked_files[i]);
        if (lstat(path, &st) == 0 && mount("/dev/null", path, NULL, MS_BIND, NULL) < 0)
            return -1;
    }
    for (size_t i = 0; i < sizeof proc_masked_dirs / sizeof *proc_masked_dirs; i++) {
        snprintf(path, sizeof path, "/proc/%s", proc_masked_dirs[i]);
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode) &&
            mount("tmpfs", path, "tmpfs", MS_RDONLY, "size=0") < 0)
            return -1;
    }
    return 0;
}

static int strip_slashes(const char *target, char *buf, size_t size)
{
    while (*target == '/')
        target++;
    size_t len = strlen(target);
    while (len > 0 && target[len - 1] == '/')
        len--;
    if (len >= size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, target, len);
    buf[len] = '\0';
    return 0;
}

/* Bind source (recursively) onto the inode target_fd holds, its mounts given the attributes
 * before they are attached: nothing is resolved twice. */
static int bind_onto(const char *source, int target_fd, uint64_t set)
{
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, source,
                            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (tree < 0)
        return -1;
    struct mount_attr attr = {.attr_set = set};
    int rc = (int)syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr,
                          sizeof attr);
    if (rc == 0)
        rc = (int)syscall(SYS_move_mount, tree, "", target_fd, "",
                          MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
    int saved = errno;
    close(tree);
    errno = saved;
    return rc;
}

static void build_root(const struct plan *p)
{
    char buf[64], target[PATH_MAX];
    const char *step = "bind the view";
    char bind_step[2 * PATH_MAX + 16];
    int root_fd = -1;
    if (mount(p->root, p->root, NULL, MS_BIND | MS_REC, NULL) < 0 ||
        setattr(AT_FDCWD, p->root, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV) < 0 ||
        (root_fd = open(p->root, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0)
        goto fail;
    step = "mount /proc";
    int fd = inside(root_fd, "proc", 1);
    if (fd < 0 || at(buf, sizeof buf, fd, NULL) < 0 ||
        mount("proc", buf, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        goto fail;
    close(fd);
    step = "make /dev";
    if (build_dev(root_fd) < 0)
        goto fail;
    for (size_t i = 0; i < p->nbinds; i++) {
        const struct bind *b = &p->binds[i];
        snprintf(bind_step, sizeof bind_step, "bind %s at %s", b->source, b->target);
        step = bind_step;
        if (strip_slashes(b->target, target, sizeof target) < 0)
            goto fail;
        /* The flags go on before the bind is attached, at the fd resolved once: a program of
         * another sandbox on this view may swap the target's path meanwhile. */
        fd = inside(root_fd, target, b->directory);
        uint64_t attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if (fd < 0 || bind_onto(b->source, fd, attrs | (b->readonly ? MOUNT_ATTR_RDONLY : 0)) < 0)
            goto fail;
        close(fd);
    }
    step = "pivot_root into the view";
    /* The old root ends up stacked on the new one; detaching it leaves nothing above "/". */
    if (fchdir(root_fd) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 ||
        umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        goto fail;
    close(root_fd);
    step = "protect /proc";
    if (protect_proc() < 0)
        goto fail;
    return;
fail:
    fail(errno, "cannot %s in %s: %s", step, p->root, strerror(errno));
}

static void drop_privileges(const struct plan *p)
{
    /* Docker's default set minus CAP_NET_RAW: sandbox.KEPT_CAPS, the list users read. */
    static const int kept_caps[] = {0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 27, 29, 31};
    uint64_t kept = 0;
    for (size_t i = 0; i < sizeof kept_caps / sizeof *kept_caps; i++)
        kept |= UINT64_C(1) << kept_caps[i];
    /* Real root's supplementary groups are real host groups: give none of them inside. */
    if (p->root_caller && setgroups(0, NULL) < 0)
        goto fail;
    for (int cap = 0; cap <= p->cap_last; cap++)
        if (!(kept & (UINT64_C(1) << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            goto fail;
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &head, data) < 0)
        goto fail;
    /* uid 0 gets its bounding set at execve; no inheritable or ambient bit may add to it. */
    for (int i = 0; i < 2; i++) {
        uint32_t mask = (uint32_t)(kept >> (32 * i));
        data[i].effective &= mask;
        data[i].permitted &= mask;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &head, data) < 0 ||
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        goto fail;
    return;
fail:
    fail(errno, "cannot drop privileges: %s", strerror(errno));
}

static void switch_user(const struct plan *p)
{
    if (setresgid(p->gid, p->gid, p->gid) == 0 && setresuid(p->uid, p->uid, p->uid) == 0)
        return;
    if (errno == EINVAL && p->user_hint[0] != '\0')
        fail(EINVAL, "%s", p->user_hint);
    fail(errno, "cannot run as uid %u gid %u inside: %s", (unsigned)p->uid, (unsigned)p->gid,
         strerror(errno));
}

static pid_t start_program(const struct plan *p)
{
    fds_from(FD_ERR, 1);
    if (chdir(p->cwd) < 0)
        fail(errno, "cwd '%s' inside the image: %s", p->cwd, strerror(errno));
    drop_privileges(p);
    if (p->switch_user) {
        switch_user(p);
        /* A change of credentials clears the parent-death signal: set it again, then make sure
         * the caller did not die in between (no signal would come for that). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
            fail(errno, "sandbox init: PR_SET_PDEATHSIG: %s", strerror(errno));
        struct pollfd caller = {.fd = FD_CALLER, .events = POLLIN};
        if (poll(&caller, 1, 0) != 0)
            _exit(EXIT_FAILED);
    }
    close(FD_CALLER);
    /* posix_spawnp searches the PATH of our own environment (empty, the starter's): the
     * program gets its environment from FD_ENV, the search uses SEARCHPATH. */
    if (setenv("PATH", p->search_path, 1) < 0)
        fail(errno, "sandbox init: cannot set PATH: %s", strerror(errno));
    posix_spawnattr_t attr;
    sigset_t defaults, none;
    sigemptyset(&defaults);
    sigemptyset(&none);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGQUIT);
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGXFSZ);
    int rc = posix_spawnattr_init(&attr);
    if (rc == 0)
        rc = posix_spawnattr_setsigdefault(&attr, &defaults);
    if (rc == 0)
        rc = posix_spawnattr_setsigmask(&attr, &none);
    if (rc == 0)
        rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    if (rc != 0)
        fail(rc, "sandbox init: posix_spawnattr: %s", strerror(rc));
    pid_t pid;
    rc = posix_spawnp(&pid, p->argv[0], NULL, &attr, p->argv, p->envp);
    if (rc == ENOENT)
        fail(ENOENT, "%s: not found in the image (PATH=%s)", p->argv[0], p->search_path);
    if (rc != 0)
        fail(rc, "cannot run %s: %s", p->argv[0], strerror(rc));
    return pid;
}

static void forward(int sig)
{
    if (program_pid > 0)
        kill(program_pid, sig);
}

static void __attribute__((noreturn)) init_main(const struct plan *p)
{
    /* Before anything else: die with the caller. PR_SET_PDEATHSIG follows the thread that
     * started the starter (our parent by CLONE_PARENT), so the caller's pidfd then says
     * whether it died before this line (getppid() is 0 in a new PID namespace). */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        fail(errno, "sandbox init: PR_SET_PDEATHSIG: %s", strerror(errno));
    struct pollfd caller = {.fd = FD_CALLER, .events = POLLIN};
    int ready = poll(&caller, 1, 0);
    if (ready != 0)
        _exit(EXIT_FAILED); /* dead (or unknowable): nobody wants us any more */
    /* FD_CALLER stays open until the switch to the program's user (start_program). */
    close(FD_PID);
    struct sigaction ign = {.sa_handler = SIG_IGN};
    sigset_t all;
    sigemptyset(&all);
    if (sigaction(SIGINT, &ign, NULL) < 0 || sigaction(SIGQUIT, &ign, NULL) < 0 ||
        sigprocmask(SIG_SETMASK, &all, NULL) < 0)
        fail(errno, "sandbox init: signals: %s", strerror(errno));
    char answer[MSG_MAX];
    ssize_t n;
    do
        n = read(FD_GO, answer, sizeof answer - 1);
    while (n < 0 && errno == EINTR);
    close(FD_GO);
    if (n <= 0)
        fail(EPERM, "cannot write the sandbox's uid and gid maps: %s",
             "the caller gave no answer (it died?)");
    answer[n] = '\0';
    if (strcmp(answer, "1") != 0)
        fail(EPERM, "cannot write the sandbox's uid and gid maps: %s",
             answer[1] ? answer + 1 : "the caller gave no answer (it died?)");

    /* Before the program exists: nothing inside may ptrace init or take its fds. Not before
     * the maps: an ordinary caller writes them through /proc/PID, which this closes to it. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        fail(errno, "sandbox init: PR_SET_DUMPABLE: %s", strerror(errno));
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
        sethostname(p->hostname, strlen(p->hostname)) < 0)
        goto ns_fail;
    if (p->own_network) {
        int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        memcpy(ifr.ifr_name, "lo", 3);
        ifr.ifr_flags = IFF_UP;
        if (s < 0 || ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            goto ns_fail;
        close(s);
    }

    build_root(p);
    pid_t program = start_program(p);
    program_pid = program;
    close(FD_ERR);
    struct sigaction fwd = {.sa_handler = forward, .sa_flags = SA_RESTART};
    int forwarded[] = {SIGTERM, SIGHUP, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaction(forwarded[i], &fwd, NULL); /* cannot fail for these signals */
    int status = 0;
    for (;;) {
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == program)
            break;
        if (pid < 0 && errno != EINTR)
            _exit(EXIT_FAILED); /* ECHILD: cannot happen while the program is ours */
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    char text[16];
    int len = snprintf(text, sizeof text, "%d", code);
    if (write(FD_STATUS, text, (size_t)len) < 0)
        _exit(EXIT_FAILED);
    _exit(0);
ns_fail:
    fail(errno, "cannot set up the sandbox's namespaces: %s", strerror(errno));
}

#define NAMESPACES                                                                          \
    (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP)

/* --check: whether clone3 into the namespaces works here (a seccomp filter may refuse it). */
static int check(void)
{
    struct clone_args args = {.flags = NAMESPACES | CLONE_NEWNET, .exit_signal = SIGCHLD};
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0)
        _exit(0);
    if (pid < 0) {
        printf("clone3: %s\n", strerror(errno));
        return EXIT_CLONE_REFUSED;
    }
    int status;
    while (waitpid((pid_t)pid, &status, 0) < 0)
        if (errno != EINTR)
            return EXIT_FAILED;
    puts(VERSION);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        puts(VERSION);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "--check") == 0)
        return check();
    if (argc < 2 || strcmp(argv[1], VERSION) != 0) {
        fputs("pytest-layers' sandbox init: started by pytest-layers only (" VERSION ")\n",
              stderr);
        return 2;
    }
    fds_from(FIRST_FREE_FD, 0);
    struct plan plan;
    memset(&plan, 0, sizeof plan);
    parse(argc, argv, &plan);
    read_env(&plan);
    plan.cap_last = read_cap_last();

    uint64_t flags = CLONE_PARENT | NAMESPACES | (plan.own_network ? CLONE_NEWNET : 0);
    /* With CLONE_PARENT the kernel wants exit_signal 0: init then signals our own parent as
     * we would (SIGCHLD, posix_spawn's). */
    struct clone_args args = {.flags = flags, .exit_signal = 0};
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0)
        init_main(&plan);
    if (pid < 0) {
        int err = errno;
        char line[MSG_MAX];
        int n = snprintf(line, sizeof line,
                         "%d:cannot create the sandbox's namespaces (user, mount, pid, uts, ipc, "
                         "net): a seccomp filter, an LSM policy or a sysctl forbids them: %s",
                         err, strerror(err));
        size_t len = n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
        /* Should the report fail, the exit status alone still says "refused". */
        if (len > 0 && write(FD_ERR, line, len) < 0)
            _exit(EXIT_CLONE_REFUSED);
        _exit(EXIT_CLONE_REFUSED);
    }
    char text[32];
    int n = snprintf(text, sizeof text, "%ld\n", pid);
    if (write(FD_PID, text, (size_t)n) != n)
        _exit(EXIT_FAILED); /* the caller sees no pid: it kills and reaps what it finds */
    return 0;
}
