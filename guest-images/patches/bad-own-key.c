// SPDX-License-Identifier: GPL-2.0
/*
 * bad-own-key.c: a patch that defines a static key of its own and branches
 * on it. The kernel's module loader would initialise the key's entries
 * from the module's __jump_table; klpvisor follows only the kernel's keys,
 * so it must refuse the module, naming the key.
 *
 * set_cpu_itimer is copied from Debian's linux-source-6.1 (kernel/time/
 * itimer.c), with one change: the tick rounding of a new expiry is behind
 * the patch's own static key.
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched/signal.h>
#include <linux/posix-timers.h>
#include <linux/time.h>
#include <linux/jump_label.h>
#include <trace/events/timer.h>

static DEFINE_STATIC_KEY_FALSE(livepatch_round_expiry);

static void livepatch_set_cpu_itimer(struct task_struct *tsk, unsigned int clock_id,
				     const struct itimerspec64 *const value,
				     struct itimerspec64 *const ovalue)
{
	u64 oval, nval, ointerval, ninterval;
	struct cpu_itimer *it = &tsk->signal->it[clock_id];

	nval = timespec64_to_ns(&value->it_value);
	ninterval = timespec64_to_ns(&value->it_interval);

	spin_lock_irq(&tsk->sighand->siglock);

	oval = it->expires;
	ointerval = it->incr;
	if (oval || nval) {
		if (static_branch_unlikely(&livepatch_round_expiry) && nval > 0)
			nval += TICK_NSEC;
		set_process_cpu_timer(tsk, clock_id, &nval, &oval);
	}
	it->expires = nval;
	it->incr = ninterval;
	trace_itimer_state(clock_id == CPUCLOCK_VIRT ?
			   ITIMER_VIRTUAL : ITIMER_PROF, value, nval);

	spin_unlock_irq(&tsk->sighand->siglock);

	if (ovalue) {
		ovalue->it_value = ns_to_timespec64(oval);
		ovalue->it_interval = ns_to_timespec64(ointerval);
	}
}

static struct klp_func funcs[] = {
	{
		.old_name = "set_cpu_itimer",
		.new_func = livepatch_set_cpu_itimer,
	}, { }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	return klp_enable_patch(&patch);
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
