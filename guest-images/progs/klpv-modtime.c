// SPDX-License-Identifier: GPL-2.0
/*
 * klpv-modtime: times module loads from inside the guest, for the modload
 * benchmark (scripts/bench, tests/scenarios/modload-bench).
 *
 *   klpv-modtime LABEL MODULE.ko N
 *
 * N times: finit_module(MODULE.ko) timed with CLOCK_MONOTONIC (the whole
 * system call: everything the kernel, and any livepatch machinery hooked
 * into it, does before the load returns), then delete_module. Prints
 *   KLPV-MODTIME LABEL n=N median_us=... p99_us=... max_us=... failed=F
 * on one line, written with one write() so nothing else cuts it. With
 * LABEL "-" it prints each load's microseconds on a line of its own
 * instead (and nothing for a failed load), for a caller that aggregates.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	char name[64], line[256];
	const char *base, *dot;
	double *t;
	int n, i, got = 0, failed = 0, len;

	if (argc != 4 || (n = atoi(argv[3])) <= 0) {
		fprintf(stderr, "usage: klpv-modtime LABEL MODULE.ko N\n");
		return 2;
	}
	/* The module's name: the file's, without .ko, '-' as '_'. */
	base = strrchr(argv[2], '/');
	base = base ? base + 1 : argv[2];
	dot = strstr(base, ".ko");
	len = dot ? (int)(dot - base) : (int)strlen(base);
	if (len <= 0 || len >= (int)sizeof(name))
		return 2;
	for (i = 0; i < len; i++)
		name[i] = base[i] == '-' ? '_' : base[i];
	name[len] = 0;
	t = calloc(n, sizeof(*t));
	if (!t)
		return 1;
	for (i = 0; i < n; i++) {
		int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
		double t0, t1;

		if (fd < 0) {
			perror(argv[2]);
			return 1;
		}
		t0 = now_us();
		if (syscall(SYS_finit_module, fd, "", 0) != 0) {
			failed++;
			close(fd);
			continue;
		}
		t1 = now_us();
		close(fd);
		t[got++] = t1 - t0;
		if (syscall(SYS_delete_module, name, O_NONBLOCK) != 0) {
			perror("delete_module");
			return 1;
		}
	}
	if (!strcmp(argv[1], "-")) {
		for (i = 0; i < got; i++) {
			len = snprintf(line, sizeof(line), "%.0f\n", t[i]);
			if (write(1, line, len) != len)
				return 1;
		}
		return failed ? 1 : 0;
	}
	qsort(t, got, sizeof(*t), cmp);
	len = snprintf(line, sizeof(line),
		       "KLPV-MODTIME %s n=%d median_us=%.0f p99_us=%.0f max_us=%.0f failed=%d\n",
		       argv[1], got, got ? t[got / 2] : 0.0,
		       got ? t[(got * 99) / 100 < got ? (got * 99) / 100 : got - 1] : 0.0,
		       got ? t[got - 1] : 0.0, failed);
	if (write(1, line, len) != len)
		return 1;
	return 0;
}
