// SPDX-License-Identifier: GPL-2.0
/*
 * klpv-v1.c: the first of a cumulative-patch pair (with klpv-v2.c), on
 * three functions one read of /proc/PID/status reaches:
 *   f = task_mem                    (the VmPeak.. lines)
 *   g = proc_task_name              (the Name: line)
 *   h = cpuset_task_status_allowed  (the Cpus_allowed lines)
 * v1 (non-replace) patches f and g; v2 (replace) patches f and h.
 *
 * Each f prints one block that calls g and h itself, so a single read
 * shows all three at once:
 *   KLPV-F v1 | KLPV-G <comm>+g1 | KLPV-H <h's output> | KLPV-END
 * A task inside f is on f's stack while g and h run, so the safe-point
 * rule makes the block consistent: v1's f always shows v1's g and the
 * original h; v2's f the original g and v2's h ("klpv-h2"). Any other mix
 * in a block means a transition was not atomic.
 *
 * g and h are not exported; klpvisor resolves them from kallsyms, as
 * kpatch's .klp.sym relocations would (built with KLPV_MODPOST_WARN=1).
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/cpuset.h>

void proc_task_name(struct seq_file *m, struct task_struct *p, bool escape);

static void livepatch_task_mem(struct seq_file *m, struct mm_struct *mm)
{
	seq_puts(m, "KLPV-F v1\nKLPV-G ");
	proc_task_name(m, current, false);
	seq_puts(m, "\nKLPV-H ");
	cpuset_task_status_allowed(m, current);
	seq_puts(m, "KLPV-END\n");
}

static void livepatch_proc_task_name(struct seq_file *m, struct task_struct *p,
				     bool escape)
{
	char comm[TASK_COMM_LEN];

	__get_task_comm(comm, sizeof(comm), p);
	seq_printf(m, "%s+g1", comm);
}

static struct klp_func funcs[] = {
	{ .old_name = "task_mem", .new_func = livepatch_task_mem },
	{ .old_name = "proc_task_name", .new_func = livepatch_proc_task_name },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
#ifdef KLPV_CUMULATIVE
	.replace = true,
#endif
};

static int klpv_v1_init(void)
{
	return klp_enable_patch(&patch);
}

static void klpv_v1_exit(void)
{
}

module_init(klpv_v1_init);
module_exit(klpv_v1_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
