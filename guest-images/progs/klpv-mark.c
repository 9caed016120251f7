/*
 * klpv-mark [value]: write one byte to I/O port 0x3f0 (default 123).
 *
 * Boot-timer convention shared with the VMM (vmm/src/devices/boot_timer.rs,
 * after Firecracker): the guest init writes 123 to port 0x3f0 as soon as
 * userspace is up, and the VMM timestamps that write.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/io.h>

#define BOOT_TIMER_PORT 0x3f0

int main(int argc, char **argv)
{
	unsigned long value = 123;

	if (argc > 2) {
		fprintf(stderr, "usage: klpv-mark [value]\n");
		return 2;
	}
	if (argc == 2) {
		char *end;
		value = strtoul(argv[1], &end, 0);
		if (*argv[1] == '\0' || *end != '\0' || value > 255) {
			fprintf(stderr, "klpv-mark: bad value '%s' (0..255)\n", argv[1]);
			return 2;
		}
	}
	if (ioperm(BOOT_TIMER_PORT, 1, 1) != 0) {
		fprintf(stderr, "klpv-mark: ioperm(0x%x): %s\n", BOOT_TIMER_PORT,
			strerror(errno));
		return 1;
	}
	outb((unsigned char)value, BOOT_TIMER_PORT);
	return 0;
}
