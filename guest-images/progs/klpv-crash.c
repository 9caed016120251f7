/*
 * klpv-crash: crash the guest kernel (sysrq 'c') once the console has sent
 * everything user space wrote to it.
 *
 * A panic prints straight to the UART, while user-space output waits in
 * the tty layer's buffer; writing to /proc/sysrq-trigger right after an
 * echo can splice the kernel's "Kernel panic - not syncing" into the
 * middle of a user line. tcdrain() returns only when the console has
 * transmitted all pending output, so the panic message starts on its own.
 */
#include <fcntl.h>
#include <stdio.h>
#include <termios.h>
#include <unistd.h>

int main(void)
{
	int fd;

	fflush(stdout);
	/* Not a terminal (a test with output redirected): nothing to drain. */
	tcdrain(STDOUT_FILENO);
	fd = open("/proc/sysrq-trigger", O_WRONLY);
	if (fd < 0) {
		perror("klpv-crash: /proc/sysrq-trigger");
		return 1;
	}
	if (write(fd, "c", 1) != 1) {
		perror("klpv-crash: write");
		return 1;
	}
	/* Not reached: the kernel has panicked. */
	return 1;
}
