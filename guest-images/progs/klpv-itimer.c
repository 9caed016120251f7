/*
 * klpv-itimer: arms ITIMER_PROF for one second, reads it straight back and
 * disarms it, ROUNDS times (default 20), and prints the most the kernel
 * ever reported:
 *   KLPV-ITIMER <tag> remaining_us=<largest it_value getitimer returned, in us>
 * The kernel's set_cpu_itimer rounds a new expiry up by one tick, so right
 * after arming the timer reads more than 1000000 us unless a tick's worth
 * of CPU time was accounted between the two calls; the largest of many
 * rounds is over 1000000 us unless every round was that slow. A
 * set_cpu_itimer without the rounding never reads over 1000000 us.
 * Usage: klpv-itimer TAG [ROUNDS]
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>

int main(int argc, char **argv)
{
	const char *tag = argc > 1 ? argv[1] : "-";
	int rounds = argc > 2 ? atoi(argv[2]) : 20;
	struct itimerval on = { .it_value = { .tv_sec = 1 } }, now, off = { 0 };
	long long most = -1;

	for (int i = 0; i < rounds; i++) {
		if (setitimer(ITIMER_PROF, &on, NULL) || getitimer(ITIMER_PROF, &now) ||
		    setitimer(ITIMER_PROF, &off, NULL)) {
			perror("klpv-itimer");
			return 1;
		}
		long long us = (long long)now.it_value.tv_sec * 1000000 + now.it_value.tv_usec;
		if (us > most)
			most = us;
	}
	printf("KLPV-ITIMER %s remaining_us=%lld\n", tag, most);
	return 0;
}
