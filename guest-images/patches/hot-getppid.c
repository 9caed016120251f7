// SPDX-License-Identifier: GPL-2.0
/*
 * hot-getppid.c: a patch on a hot path. Replaces the getppid syscall
 * (__x64_sys_getppid, which the guest's test loop calls on every vCPU) with
 * a version that returns the same, correct value, so the loop can check
 * its results while the patch is applied and removed under it. Every call
 * also bumps a counter (in .bss), which shows the new code ran and that
 * writable data in the arena works.
 *
 * A cumulative patch (.replace = true), carrying one klp_state, with a
 * pre_patch and a post_unpatch callback, so the parser sees every kind of
 * klp_patch field filled in.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched.h>
#include <linux/rcupdate.h>
#include <linux/pid.h>
#include <linux/atomic.h>

#define HOT_GETPPID_STATE 1

static atomic_long_t hot_getppid_calls;

/* The same body as kernel/sys.c's SYSCALL_DEFINE0(getppid). */
static long livepatch_getppid(const struct pt_regs *regs)
{
	int pid;

	atomic_long_inc(&hot_getppid_calls);
	rcu_read_lock();
	pid = task_tgid_vnr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	return pid;
}

static int hot_pre_patch(struct klp_object *obj)
{
	return 0;
}

static void hot_post_unpatch(struct klp_object *obj)
{
}

static struct klp_func funcs[] = {
	{
		.old_name = "__x64_sys_getppid",
		.new_func = livepatch_getppid,
	}, { }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
		.callbacks = {
			.pre_patch = hot_pre_patch,
			.post_unpatch = hot_post_unpatch,
		},
	}, { }
};

static struct klp_state states[] = {
	{ .id = HOT_GETPPID_STATE, .version = 2 },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.states = states,
	.replace = true,
};

static int hot_getppid_init(void)
{
	return klp_enable_patch(&patch);
}

static void hot_getppid_exit(void)
{
}

module_init(hot_getppid_init);
module_exit(hot_getppid_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
