/*
 * klpv-stall: how long the guest stops, seen from inside it.
 *
 * One spinner thread per online CPU, pinned to it, reads CLOCK_MONOTONIC
 * in a loop and keeps the largest gap between two of its reads: while
 * every vCPU is paused the guest runs nothing, so the pause shows up as a
 * gap on every CPU (as does anything else that takes a CPU away from the
 * spinner: an interrupt, another task, the host descheduling the vCPU).
 * Besides, it holds sleeping threads, so the guest has as many tasks as a
 * benchmark row wants: each blocks in read(2) on a pipe nobody writes, as
 * an idle server worker blocks in the kernel.
 *
 * Commands on stdin, one per line; answers on stdout:
 *   threads N      grow to N sleeping threads in all
 *                  -> KLPV-STALL threads=<n>
 *   mark           the largest gap on any CPU since the last mark, then
 *                  start again
 *                  -> KLPV-STALL max_us=<us> cpu=<cpu>
 *   klp KO NAME    in-kernel livepatch of the same module, for comparison:
 *                  insmod KO, wait until /sys/kernel/livepatch/NAME/transition
 *                  reads 0, then disable it, wait again and rmmod it
 *                  -> KLPV-STALL-KLP apply_ms=<ms> apply_max_us=<us>
 *                     disable_ms=<ms> disable_max_us=<us> ok=<0|1>
 *   quit           exit
 * On start (after raising kernel.threads-max to 30000): KLPV-STALL ready cpus=<n>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 64
#define MAX_THREADS 20000

static int cpus;
/* Per CPU: the largest gap since the last mark (ns), and the epoch that a
 * mark bumps so the spinner starts again. */
static _Atomic unsigned long long max_gap[MAX_CPUS];
static _Atomic unsigned long epoch;
static int sleep_pipe[2];
static int threads;

static unsigned long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void *spin(void *arg)
{
	int cpu = (int)(long)arg;
	cpu_set_t set;
	unsigned long seen = atomic_load(&epoch);
	unsigned long long last, t, gap, best = 0;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		fprintf(stderr, "klpv-stall: pin to CPU %d: %s\n", cpu, strerror(errno));
	last = now_ns();
	for (;;) {
		unsigned long e = atomic_load_explicit(&epoch, memory_order_relaxed);

		t = now_ns();
		if (e != seen) {
			/* A mark: start a new window from this read. */
			seen = e;
			best = 0;
			last = t;
			atomic_store(&max_gap[cpu], 0);
			continue;
		}
		gap = t - last;
		last = t;
		if (gap > best) {
			best = gap;
			atomic_store(&max_gap[cpu], best);
		}
	}
	return NULL;
}

static void *sleeper(void *arg)
{
	char c;

	(void)arg;
	/* Blocks for good: nobody writes the pipe. */
	while (read(sleep_pipe[0], &c, 1) < 0 && errno == EINTR)
		;
	return NULL;
}

static int grow(int want)
{
	pthread_attr_t attr;

	if (want > MAX_THREADS)
		want = MAX_THREADS;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 16384);
	while (threads < want) {
		pthread_t t;
		int err = pthread_create(&t, &attr, sleeper, NULL);

		if (err) {
			fprintf(stderr, "klpv-stall: thread %d: %s\n", threads, strerror(err));
			break;
		}
		pthread_detach(t);
		threads++;
	}
	pthread_attr_destroy(&attr);
	return threads;
}

/* The largest gap over all CPUs since the last mark; starts a new window.
 * The spinners see the new epoch within one loop, and a window's first
 * gap is measured from their first read in it. */
static unsigned long long mark(int *which)
{
	unsigned long long best = 0;
	int cpu;

	*which = -1;
	for (cpu = 0; cpu < cpus; cpu++) {
		unsigned long long g = atomic_load(&max_gap[cpu]);

		if (g > best) {
			best = g;
			*which = cpu;
		}
	}
	atomic_fetch_add(&epoch, 1);
	return best;
}

static int transition_done(const char *name)
{
	char path[256], buf[8] = "";
	int fd, n;

	snprintf(path, sizeof(path), "/sys/kernel/livepatch/%s/transition", name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return errno == ENOENT; /* gone: nothing in transition */
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 && buf[0] == '0';
}

/* The first line of file PATH into BUF (empty if unreadable). */
static void first_line(const char *path, char *buf, size_t len)
{
	FILE *f = fopen(path, "r");

	buf[0] = 0;
	if (!f)
		return;
	if (!fgets(buf, (int)len, f))
		buf[0] = 0;
	fclose(f);
	buf[strcspn(buf, "\n")] = 0;
}

/*
 * Why a transition does not end, in the kernel's own words: every task
 * whose /proc/PID/task/TID/patch_state is not TARGET (at most 20), with its
 * comm and the top of its kernel stack, as
 *   KLPV-STALL-STUCK tid=<tid> comm=<comm> state=<patch_state> stack=<f1,f2,..>
 * and then KLPV-STALL-STUCK end count=<tasks not at TARGET>.
 */
static void dump_stuck(int target)
{
	DIR *procs = opendir("/proc");
	struct dirent *p, *t;
	int count = 0;

	while (procs && (p = readdir(procs))) {
		char path[300];
		DIR *tasks;

		if (p->d_name[0] < '1' || p->d_name[0] > '9')
			continue;
		snprintf(path, sizeof(path), "/proc/%s/task", p->d_name);
		tasks = opendir(path);
		while (tasks && (t = readdir(tasks))) {
			char base[600], file[640], state[32], comm[64], stack[512] = "", line[128];
			FILE *f;

			if (t->d_name[0] < '1' || t->d_name[0] > '9')
				continue;
			snprintf(base, sizeof(base), "/proc/%s/task/%s", p->d_name, t->d_name);
			snprintf(file, sizeof(file), "%s/patch_state", base);
			first_line(file, state, sizeof(state));
			if (!state[0] || atoi(state) == target)
				continue;
			if (++count > 20)
				continue;
			snprintf(file, sizeof(file), "%s/comm", base);
			first_line(file, comm, sizeof(comm));
			snprintf(file, sizeof(file), "%s/stack", base);
			f = fopen(file, "r");
			for (int i = 0; f && i < 6 && fgets(line, sizeof(line), f); i++) {
				char *fn = strchr(line, ' ');

				line[strcspn(line, "\n")] = 0;
				strncat(stack, i ? "," : "", sizeof(stack) - strlen(stack) - 1);
				strncat(stack, fn ? fn + 1 : line, sizeof(stack) - strlen(stack) - 1);
			}
			if (f)
				fclose(f);
			printf("KLPV-STALL-STUCK tid=%s comm=%s state=%s stack=%s\n",
			       t->d_name, comm, state, stack);
		}
		if (tasks)
			closedir(tasks);
	}
	if (procs)
		closedir(procs);
	printf("KLPV-STALL-STUCK end count=%d\n", count);
}

/* Waits up to 60 s for NAME's transition to TARGET (1 patched, 0
 * unpatched) to end; returns ms waited, or -1 after saying which tasks
 * hold it up. */
static long settle(const char *name, int target, unsigned long long t0)
{
	while (!transition_done(name)) {
		if (now_ns() - t0 > 60000000000ull) {
			dump_stuck(target);
			return -1;
		}
		usleep(1000);
	}
	return (long)((now_ns() - t0) / 1000000);
}

/* Runs `insmod KO` or `rmmod KO`; if it has not returned after 60 s, says
 * where it waits (its kernel stack, and the tasks a transition to TARGET
 * still waits for), then waits for it. Returns its exit status. */
static int run_mod(const char *tool, const char *arg, int target)
{
	unsigned long long t0 = now_ns();
	int status, said = 0;
	pid_t pid = fork();

	if (pid < 0)
		return -1;
	if (pid == 0) {
		execlp(tool, tool, arg, (char *)NULL);
		_exit(127);
	}
	for (;;) {
		pid_t r = waitpid(pid, &status, WNOHANG);

		if (r == pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
		if (r < 0)
			return -1;
		if (!said && now_ns() - t0 > 60000000000ull) {
			char path[64], stack[128];

			snprintf(path, sizeof(path), "/proc/%d/stack", (int)pid);
			first_line(path, stack, sizeof(stack));
			printf("KLPV-STALL-KLP %s-slow pid=%d stack-top=%s\n", tool, (int)pid, stack);
			dump_stuck(target);
			said = 1;
		}
		usleep(10000);
	}
}

static void klp(const char *ko, const char *name)
{
	char path[256];
	unsigned long long t0;
	long apply_ms, disable_ms = -1;
	unsigned long long apply_max, disable_max = 0;
	int which, fd, ok = 0;

	mark(&which);
	t0 = now_ns();
	if (run_mod("insmod", ko, 1) != 0) {
		printf("KLPV-STALL-KLP insmod-failed ko=%s\n", ko);
		return;
	}
	apply_ms = settle(name, 1, t0);
	apply_max = mark(&which);
	snprintf(path, sizeof(path), "/sys/kernel/livepatch/%s/enabled", name);
	t0 = now_ns();
	fd = open(path, O_WRONLY);
	if (fd >= 0 && write(fd, "0", 1) == 1) {
		disable_ms = settle(name, 0, t0);
		disable_max = mark(&which);
		ok = apply_ms >= 0 && disable_ms >= 0;
	}
	if (fd >= 0)
		close(fd);
	if (run_mod("rmmod", name, 0) != 0)
		ok = 0;
	printf("KLPV-STALL-KLP apply_ms=%ld apply_max_us=%llu disable_ms=%ld disable_max_us=%llu ok=%d\n",
	       apply_ms, apply_max / 1000, disable_ms, disable_max / 1000, ok);
}

int main(void)
{
	char line[512];
	int cpu;

	setvbuf(stdout, NULL, _IOLBF, 0);
	cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
	if (cpus < 1 || cpus > MAX_CPUS) {
		fprintf(stderr, "klpv-stall: %d CPUs\n", cpus);
		return 1;
	}
	/* The kernel sizes threads-max from RAM (about 8000 in 1 GiB);
	 * a row of 10000 sleeping threads needs more. */
	{
		int fd = open("/proc/sys/kernel/threads-max", O_WRONLY);

		if (fd >= 0) {
			if (write(fd, "30000", 5) != 5)
				perror("klpv-stall: threads-max");
			close(fd);
		}
	}
	if (pipe(sleep_pipe) != 0) {
		perror("klpv-stall: pipe");
		return 1;
	}
	for (cpu = 0; cpu < cpus; cpu++) {
		pthread_t t;

		if (pthread_create(&t, NULL, spin, (void *)(long)cpu) != 0) {
			perror("klpv-stall: spinner");
			return 1;
		}
	}
	printf("KLPV-STALL ready cpus=%d\n", cpus);
	while (fgets(line, sizeof(line), stdin)) {
		char ko[256], name[128];
		int n, which;

		if (sscanf(line, "threads %d", &n) == 1) {
			printf("KLPV-STALL threads=%d\n", grow(n));
		} else if (strncmp(line, "mark", 4) == 0) {
			unsigned long long g = mark(&which);

			printf("KLPV-STALL max_us=%llu cpu=%d\n", g / 1000, which);
		} else if (sscanf(line, "klp %255s %127s", ko, name) == 2) {
			klp(ko, name);
		} else if (strncmp(line, "quit", 4) == 0) {
			break;
		}
	}
	return 0;
}
