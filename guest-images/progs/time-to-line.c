/*
 * time-to-line PATTERN -- CMD [ARGS...]
 *
 * Runs CMD with its stdout and stderr on one pipe, copies every line through to
 * our stdout, and when the first line containing PATTERN arrives prints
 *   TIME-TO-LINE pattern=<PATTERN> ms=<ms since just before fork, 1 decimal>
 * on a line of its own (or ms=none at the end if it never appeared).
 * Used to time "VMM/QEMU start -> guest prints KLPV-READY" from outside the
 * guest, the same way for QEMU and for our VMM.
 * Exit status: CMD's exit status, or 128+signal if it was killed.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

static void write_all(const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(STDOUT_FILENO, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return; /* stdout gone: keep draining the child anyway */
		}
		p += w;
		n -= (size_t)w;
	}
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void report(const char *pattern, double ms)
{
	char buf[4096];
	int n;

	if (ms < 0)
		n = snprintf(buf, sizeof buf, "TIME-TO-LINE pattern=%s ms=none\n", pattern);
	else
		n = snprintf(buf, sizeof buf, "TIME-TO-LINE pattern=%s ms=%.1f\n", pattern, ms);
	if (n > 0)
		write_all(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

int main(int argc, char **argv)
{
	const char *pattern;
	int fds[2], status, found = 0;
	pid_t pid;
	double t0;
	char *line = NULL;
	size_t len = 0, cap = 0;

	if (argc < 4 || strcmp(argv[2], "--") != 0) {
		fprintf(stderr, "usage: time-to-line PATTERN -- CMD [ARGS...]\n");
		return 2;
	}
	pattern = argv[1];
	signal(SIGPIPE, SIG_IGN);
	if (pipe(fds) != 0) {
		perror("time-to-line: pipe");
		return 2;
	}

	t0 = now_ms();
	pid = fork();
	if (pid < 0) {
		perror("time-to-line: fork");
		return 2;
	}
	if (pid == 0) {
		close(fds[0]);
		dup2(fds[1], STDOUT_FILENO);
		dup2(fds[1], STDERR_FILENO);
		if (fds[1] > STDERR_FILENO)
			close(fds[1]);
		signal(SIGPIPE, SIG_DFL);
		execvp(argv[3], &argv[3]);
		fprintf(stderr, "time-to-line: exec %s: %s\n", argv[3], strerror(errno));
		_exit(127);
	}
	close(fds[1]);

	for (;;) {
		char buf[65536];
		ssize_t r = read(fds[0], buf, sizeof buf);
		double t;
		size_t i, start = 0;

		if (r < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (r == 0)
			break;
		t = now_ms();
		for (i = 0; i < (size_t)r; i++) {
			if (buf[i] != '\n')
				continue;
			/* A complete line: whatever was pending plus buf[start..i]. */
			size_t piece = i + 1 - start;
			if (len + piece + 1 > cap) {
				cap = (len + piece + 1) * 2;
				line = realloc(line, cap);
				if (!line) {
					perror("time-to-line: realloc");
					return 2;
				}
			}
			memcpy(line + len, buf + start, piece);
			len += piece;
			line[len] = '\0';
			write_all(line, len);
			if (!found && strstr(line, pattern)) {
				found = 1;
				report(pattern, t - t0);
			}
			len = 0;
			start = i + 1;
		}
		if (start < (size_t)r) { /* keep the unfinished line */
			size_t piece = (size_t)r - start;
			if (len + piece + 1 > cap) {
				cap = (len + piece + 1) * 2;
				line = realloc(line, cap);
				if (!line) {
					perror("time-to-line: realloc");
					return 2;
				}
			}
			memcpy(line + len, buf + start, piece);
			len += piece;
		}
	}
	if (len > 0) { /* last line without a newline */
		line[len] = '\0';
		write_all(line, len);
		write_all("\n", 1);
		if (!found && strstr(line, pattern)) {
			found = 1;
			report(pattern, now_ms() - t0);
		}
	}
	if (!found)
		report(pattern, -1);

	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			perror("time-to-line: waitpid");
			return 2;
		}
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return 2;
}
