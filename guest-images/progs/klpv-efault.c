/*
 * klpv-efault: reads /dev/zero into good, bad and half-bad buffers, the
 * three outcomes of read_zero's user access, and prints them on one line:
 *   KLPV-EFAULT <tag> bad=<rc>/<errno> partial=<rc> good=<ok|bad>
 * bad: a buffer at 0x1000, below mmap_min_addr, never mapped: the first
 *      store faults, the exception fixup makes read() return -EFAULT.
 * partial: 8192 bytes into two pages whose second is unmapped: read()
 *      returns the 4096 bytes before the fault.
 * good: 100 bytes into a buffer of 0xff bytes, all zero afterwards.
 * A kernel without the fixup oopses in the first case instead.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *tag = argc > 1 ? argv[1] : "-";
	int fd = open("/dev/zero", O_RDONLY);
	if (fd < 0) {
		perror("klpv-efault: /dev/zero");
		return 1;
	}

	errno = 0;
	long bad = read(fd, (void *)0x1000, 100);
	int bad_errno = errno;

	long page = sysconf(_SC_PAGESIZE);
	char *two = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (two == MAP_FAILED || munmap(two + page, page) != 0) {
		perror("klpv-efault: mmap");
		return 1;
	}
	long partial = read(fd, two, 2 * page);

	char good[100];
	memset(good, 0xff, sizeof(good));
	long n = read(fd, good, sizeof(good));
	int zero = n == (long)sizeof(good);
	for (size_t i = 0; i < sizeof(good); i++)
		zero &= good[i] == 0;

	printf("KLPV-EFAULT %s bad=%ld/%s partial=%ld good=%s\n", tag, bad,
	       bad_errno == EFAULT ? "EFAULT" : strerror(bad_errno), partial,
	       zero ? "ok" : "bad");
	return 0;
}
