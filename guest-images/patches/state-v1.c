// SPDX-License-Identifier: GPL-2.0
/*
 * state-v1.c: a cumulative patch introducing system state 1 at version 1
 * (struct klp_state), for klp's state-compatibility rule: hot-getppid.c
 * carries the same state at version 2 and so may replace this one; this
 * one may not replace hot-getppid (a downgrade of the state), and a replace
 * patch without state 1 may replace neither.
 *
 * Replaces getppid with the same body, like hot-getppid.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched.h>
#include <linux/rcupdate.h>
#include <linux/pid.h>

static long livepatch_getppid(const struct pt_regs *regs)
{
	int pid;

	rcu_read_lock();
	pid = task_tgid_vnr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	return pid;
}

static struct klp_func funcs[] = {
	{ .old_name = "__x64_sys_getppid", .new_func = livepatch_getppid },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_state states[] = {
	{ .id = 1, .version = 1 },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.states = states,
	.replace = true,
};

static int state_v1_init(void)
{
	return klp_enable_patch(&patch);
}

static void state_v1_exit(void)
{
}

module_init(state_v1_init);
module_exit(state_v1_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
