/*
 * counter N: a long-running, syscall-heavy guest workload whose result is
 * checkable. Each of the N iterations enters the kernel (getppid through
 * syscall(2), so libc cannot cache it) and folds i into a checksum; a second,
 * syscall-free loop recomputes the expected checksum. Live-patch tests run it
 * across a patch transition: the kernel keeps returning to this task, and a
 * corrupted register or skipped iteration shows up as ok=0.
 *
 * Output (line-buffered, so progress is visible through pipes):
 *   COUNTER progress=<k>/10          after N*k/10 iterations, k = 1..10
 *   COUNTER done n=<N> sum=<sum> ok=<0|1>
 * Exit status 0 iff ok=1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/syscall.h>

static uint64_t step(uint64_t i)
{
	return i ^ (i >> 3);
}

int main(int argc, char **argv)
{
	char *end;
	unsigned long long n;
	uint64_t i, sum = 0, expect = 0;
	unsigned k = 1;

	if (argc != 2) {
		fprintf(stderr, "usage: counter N\n");
		return 2;
	}
	n = strtoull(argv[1], &end, 0);
	if (*argv[1] == '\0' || *end != '\0') {
		fprintf(stderr, "counter: bad N '%s'\n", argv[1]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	/* Progress boundary k is reached after n*k/10 iterations (also for n < 10). */
#define REPORT(done)                                                          \
	while (k <= 10 && (done) >= (uint64_t)((unsigned __int128)n * k / 10)) \
		printf("COUNTER progress=%u/10\n", k++)

	REPORT(0);
	for (i = 0; i < n; i++) {
		syscall(SYS_getppid);
		sum += step(i);
		REPORT(i + 1);
	}

	/* The reference: the same fold, no kernel entries. */
	for (i = 0; i < n; i++) {
		__asm__ volatile("" : "+r"(i)); /* keep it a real loop */
		expect += step(i);
	}

	printf("COUNTER done n=%llu sum=%llu ok=%d\n", n,
	       (unsigned long long)sum, sum == expect);
	return sum == expect ? 0 : 1;
}
