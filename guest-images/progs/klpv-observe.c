/*
 * klpv-observe: what the klpv-v1/v2 cumulative patches look like from
 * inside the guest, one read(2) of /proc/self/status at a time (see
 * guest-images/patches/klpv-v1.c: f = task_mem prints a block that calls
 * g = proc_task_name and h = cpuset_task_status_allowed itself).
 *
 *   klpv-observe state
 *     one read:  KLPV-STATE f=<orig|v1|v2> g=<orig|g1|-> h=<orig|h2|->
 *                direct-g=<orig|g1> direct-h=<orig|h2>
 *     (g, h: as f's block shows them; direct-*: the Name: and Cpus_allowed
 *     lines proc_pid_status prints itself)
 *   klpv-observe watch STOPFILE
 *     reads until STOPFILE exists; every block must be one patch level
 *     (v1's f with v1's g and the original h, or v2's f with the original
 *     g and v2's h): a mix means a transition was not atomic.
 *     KLPV-OBS pid=<pid> reads=<n> orig=<n> v1=<n> v2=<n> bad=<n>
 *     exit 1 if bad > 0 (the first bad read is printed).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum level { ORIG, V1, V2, BAD };

struct seen {
	enum level f;
	int g1, h2;	    /* inside f's block */
	int direct_g1, direct_h2; /* outside it */
};

static char buf[65536];

static int read_status(void)
{
	int fd = open("/proc/self/status", O_RDONLY);
	ssize_t n;

	if (fd < 0) {
		perror("open /proc/self/status");
		exit(2);
	}
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0) {
		perror("read /proc/self/status");
		exit(2);
	}
	buf[n] = 0;
	return (int)n;
}

/* Whether [from, to) contains needle. */
static int has(const char *from, const char *to, const char *needle)
{
	size_t len = strlen(needle);
	const char *p;

	for (p = from; p + len <= to; p++)
		if (!memcmp(p, needle, len))
			return 1;
	return 0;
}

static struct seen observe(void)
{
	struct seen s = { ORIG, 0, 0, 0, 0 };
	int n = read_status();
	char *end = buf + n;
	char *block = strstr(buf, "KLPV-F v");
	char *block_end = block ? strstr(block, "KLPV-END") : NULL;

	if (block) {
		if (!block_end)
			block_end = end;
		s.f = block[8] == '1' ? V1 : block[8] == '2' ? V2 : BAD;
		s.g1 = has(block, block_end, "+g1");
		s.h2 = has(block, block_end, "klpv-h2");
		s.direct_g1 = has(buf, block, "+g1") || has(block_end, end, "+g1");
		s.direct_h2 = has(buf, block, "klpv-h2") || has(block_end, end, "klpv-h2");
	} else {
		s.direct_g1 = has(buf, end, "+g1");
		s.direct_h2 = has(buf, end, "klpv-h2");
	}
	return s;
}

static enum level level(struct seen s)
{
	if (s.f == V1 && s.g1 && !s.h2)
		return V1;
	if (s.f == V2 && !s.g1 && s.h2)
		return V2;
	return s.f == ORIG ? ORIG : BAD;
}

int main(int argc, char **argv)
{
	static const char *const fname[] = { "orig", "v1", "v2", "bad" };
	unsigned long count[4] = { 0 }, reads = 0;

	if (argc == 2 && !strcmp(argv[1], "state")) {
		struct seen s = observe();

		printf("KLPV-STATE f=%s g=%s h=%s direct-g=%s direct-h=%s\n",
		       fname[s.f], s.f == ORIG ? "-" : s.g1 ? "g1" : "orig",
		       s.f == ORIG ? "-" : s.h2 ? "h2" : "orig",
		       s.direct_g1 ? "g1" : "orig", s.direct_h2 ? "h2" : "orig");
		return 0;
	}
	if (argc != 3 || strcmp(argv[1], "watch")) {
		fprintf(stderr, "usage: klpv-observe state | watch STOPFILE\n");
		return 2;
	}
	for (;;) {
		enum level l;

		if ((reads & 63) == 0 && access(argv[2], F_OK) == 0)
			break;
		l = level(observe());
		reads++;
		if (l == BAD && count[BAD] == 0) {
			char *b = strstr(buf, "KLPV-F");
			char *p;

			for (p = b; p && *p; p++)
				if (*p == '\n' || *p == '\t')
					*p = '|';
			printf("KLPV-OBS-BAD pid=%d read=%lu %s\n", getpid(), reads, b ? b : "?");
		}
		count[l]++;
	}
	printf("KLPV-OBS pid=%d reads=%lu orig=%lu v1=%lu v2=%lu bad=%lu\n", getpid(), reads,
	       count[ORIG], count[V1], count[V2], count[BAD]);
	return count[BAD] ? 1 : 0;
}
