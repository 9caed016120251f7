/*
 * getppid-bench N: the per-call cost of the getppid syscall (through
 * syscall(2), so libc cannot cache it), the hot function the benchmark
 * patches: best of 5 runs of N calls, each result checked.
 *
 * Output: GETPPID ns_per_call=<best> n=<N> ok=<0|1>
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;
	long want = getppid(), i;
	double best = 1e18;
	int ok = 1, run;

	for (run = 0; run < 5; run++) {
		double t0 = now_ns(), dt;

		for (i = 0; i < n; i++)
			if (syscall(SYS_getppid) != want)
				ok = 0;
		dt = (now_ns() - t0) / n;
		if (dt < best)
			best = dt;
	}
	printf("GETPPID ns_per_call=%.1f n=%ld ok=%d\n", best, n, ok);
	return ok ? 0 : 1;
}
