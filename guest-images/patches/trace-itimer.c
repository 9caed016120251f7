// SPDX-License-Identifier: GPL-2.0
/*
 * trace-itimer.c: a patch whose code holds a tracepoint, so the module has
 * a __jump_table entry for the tracepoint's static key (and a static call
 * through its __SCT__ trampoline). klpvisor links the site into the key's
 * list as the module loader would, so enabling the trace event in the guest
 * makes the kernel turn the site in patch code into a jump.
 *
 * set_cpu_itimer is copied from Debian's linux-source-6.1 (kernel/time/
 * itimer.c; 6.12's is the same), with one change: a new expiry is no longer
 * rounded up by a tick.
 * set_process_cpu_timer and the tracepoint are not exported to modules;
 * this test module is built with modpost warnings only.
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched/signal.h>
#include <linux/posix-timers.h>
#include <linux/time.h>
#include <trace/events/timer.h>

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
	if (oval || nval)
		set_process_cpu_timer(tsk, clock_id, &nval, &oval);
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
