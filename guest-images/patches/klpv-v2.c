// SPDX-License-Identifier: GPL-2.0
/*
 * klpv-v2.c: the cumulative successor of klpv-v1.c (read its comment):
 * .replace = true, patches f = task_mem (a new body) and
 * h = cpuset_task_status_allowed. After it, g = proc_task_name is the
 * kernel's own again, and v1 ends replaced.
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
	seq_puts(m, "KLPV-F v2\nKLPV-G ");
	proc_task_name(m, current, false);
	seq_puts(m, "\nKLPV-H ");
	cpuset_task_status_allowed(m, current);
	seq_puts(m, "KLPV-END\n");
}

static void livepatch_cpuset_task_status_allowed(struct seq_file *m,
						 struct task_struct *task)
{
	seq_puts(m, "Cpus_allowed:\tklpv-h2\n");
}

static struct klp_func funcs[] = {
	{ .old_name = "task_mem", .new_func = livepatch_task_mem },
	{ .old_name = "cpuset_task_status_allowed",
	  .new_func = livepatch_cpuset_task_status_allowed },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.replace = true,
};

static int klpv_v2_init(void)
{
	return klp_enable_patch(&patch);
}

static void klpv_v2_exit(void)
{
}

module_init(klpv_v2_init);
module_exit(klpv_v2_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
