/*
 * klpv-fentry: a BPF fentry program on a kernel function, counting its
 * calls, around one command, as `bpftrace -e 'fentry:FUNC { @++ }'` would:
 * the program is attached through the kernel's BPF trampoline (ftrace's
 * direct call, shared with any ftrace_ops that changes the instruction
 * pointer, as a livepatch's does), the command runs, and the count is
 * read back:
 *   <the command's own output>
 *   KLPV-FENTRY-HITS hits=<calls the program saw> (or error=<why>)
 * Usage: klpv-fentry FUNC COMMAND [ARG...]
 * No libbpf in the guest: the function's BTF id comes from
 * /sys/kernel/btf/vmlinux, the program is nine instructions.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *what)
{
	printf("KLPV-FENTRY-HITS error=%s:%s\n", what, strerror(errno));
	return 1;
}

static long bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

/* The BTF id of the FUNC named `name` in the kernel's BTF, or -1. */
static long btf_func_id(const char *name)
{
	static char buf[16 << 20];
	int fd = open("/sys/kernel/btf/vmlinux", O_RDONLY);
	if (fd < 0)
		return -1;
	size_t len = 0;
	ssize_t n;
	while (len < sizeof(buf) && (n = read(fd, buf + len, sizeof(buf) - len)) > 0)
		len += n;
	close(fd);
	struct {
		uint16_t magic;
		uint8_t version, flags;
		uint32_t hdr_len, type_off, type_len, str_off, str_len;
	} h;
	if (len < sizeof(h))
		return -1;
	memcpy(&h, buf, sizeof(h));
	if (h.magic != 0xeb9f || (size_t)h.hdr_len + h.str_off + h.str_len > len ||
	    (size_t)h.hdr_len + h.type_off + h.type_len > len)
		return -1;
	const char *strs = buf + h.hdr_len + h.str_off;
	size_t at = h.hdr_len + h.type_off, end = at + h.type_len;
	for (long id = 1; at + 12 <= end; id++) {
		uint32_t name_off, info;
		memcpy(&name_off, buf + at, 4);
		memcpy(&info, buf + at + 4, 4);
		unsigned kind = (info >> 24) & 0x1f, vlen = info & 0xffff;
		if (kind == 12 && name_off < h.str_len && !strcmp(strs + name_off, name))
			return id;
		at += 12;
		switch (kind) {
		case 1: case 14: case 17: at += 4; break;           /* INT, VAR, DECL_TAG */
		case 3: at += 12; break;                            /* ARRAY */
		case 4: case 5: case 15: case 19: at += 12 * vlen; break; /* STRUCT, UNION, DATASEC, ENUM64 */
		case 6: case 13: at += 8 * vlen; break;             /* ENUM, FUNC_PROTO */
		default: break;
		}
	}
	return -1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: klpv-fentry FUNC COMMAND [ARG...]\n");
		return 2;
	}
	long id = btf_func_id(argv[1]);
	if (id < 0) {
		errno = ENOENT;
		return fail("btf");
	}
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_type = BPF_MAP_TYPE_ARRAY;
	a.key_size = 4;
	a.value_size = 8;
	a.max_entries = 1;
	int map = bpf(BPF_MAP_CREATE, &a);
	if (map < 0)
		return fail("map");
	struct bpf_insn prog[] = {
		/* *(u32 *)(r10 - 4) = 0; r2 = r10 - 4; r1 = map */
		{ .code = BPF_ST | BPF_MEM | BPF_W, .dst_reg = 10, .off = -4, .imm = 0 },
		{ .code = BPF_ALU64 | BPF_MOV | BPF_X, .dst_reg = 2, .src_reg = 10 },
		{ .code = BPF_ALU64 | BPF_ADD | BPF_K, .dst_reg = 2, .imm = -4 },
		{ .code = BPF_LD | BPF_DW | BPF_IMM, .dst_reg = 1, .src_reg = BPF_PSEUDO_MAP_FD, .imm = map },
		{ 0 },
		/* r0 = bpf_map_lookup_elem(r1, r2); if (r0) *(u64 *)r0 += 1 */
		{ .code = BPF_JMP | BPF_CALL, .imm = BPF_FUNC_map_lookup_elem },
		{ .code = BPF_JMP | BPF_JEQ | BPF_K, .dst_reg = 0, .off = 2, .imm = 0 },
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 1, .imm = 1 },
		{ .code = BPF_STX | BPF_DW | BPF_ATOMIC, .dst_reg = 0, .src_reg = 1, .imm = BPF_ADD },
		/* return 0 */
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	static char log[65536];
	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_TRACING;
	a.expected_attach_type = BPF_TRACE_FENTRY;
	a.attach_btf_id = id;
	a.insns = (uintptr_t)prog;
	a.insn_cnt = sizeof(prog) / sizeof(prog[0]);
	a.license = (uintptr_t)"GPL";
	a.log_buf = (uintptr_t)log;
	a.log_size = sizeof(log);
	a.log_level = 1;
	int fd = bpf(BPF_PROG_LOAD, &a);
	if (fd < 0) {
		fprintf(stderr, "%s\n", log);
		return fail("load");
	}
	memset(&a, 0, sizeof(a));
	a.raw_tracepoint.prog_fd = fd;
	int link = bpf(BPF_RAW_TRACEPOINT_OPEN, &a);
	if (link < 0)
		return fail("attach");
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		execvp(argv[2], argv + 2);
		_exit(127);
	}
	int status = 0;
	if (pid < 0 || waitpid(pid, &status, 0) < 0)
		return fail("command");
	uint32_t key = 0;
	uint64_t hits = 0;
	memset(&a, 0, sizeof(a));
	a.map_fd = map;
	a.key = (uintptr_t)&key;
	a.value = (uintptr_t)&hits;
	if (bpf(BPF_MAP_LOOKUP_ELEM, &a))
		return fail("read");
	close(link);
	printf("KLPV-FENTRY-HITS hits=%llu\n", (unsigned long long)hits);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
