// SPDX-License-Identifier: GPL-2.0
/*
 * block-nsleep.c: replaces common_nsleep (kernel/time/posix-timers.c, the
 * clock_nanosleep path `sleep` takes) with the same body. A task sleeping
 * in `sleep N` has common_nsleep on its stack for N seconds, so this patch
 * is the consistency model's test: its transition must wait until the
 * sleeper leaves, and fail cleanly (nothing changed, the sleeper named)
 * when it does not leave in time.
 *
 * hrtimer_nanosleep is global but not exported: kbuild's modpost refuses
 * it, so this module is built with modpost warnings only, and klpvisor
 * resolves it from the guest's kallsyms (kpatch would emit a
 * .klp.sym.vmlinux.hrtimer_nanosleep,0 relocation for in-kernel klp).
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/hrtimer.h>
#include <linux/time.h>

static int livepatch_common_nsleep(const clockid_t which_clock, int flags,
				   const struct timespec64 *rqtp)
{
	ktime_t texp = timespec64_to_ktime(*rqtp);

	return hrtimer_nanosleep(texp, flags & TIMER_ABSTIME ?
				 HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				 which_clock);
}

static struct klp_func funcs[] = {
	{
		.old_name = "common_nsleep",
		.new_func = livepatch_common_nsleep,
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
