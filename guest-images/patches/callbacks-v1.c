// SPDX-License-Identifier: GPL-2.0
/*
 * callbacks-v1.c: a patch with all four klp callbacks, each of which logs
 * one line to the kernel log:
 *   klpv-cb v<N> <callback> obj=<object name> live=<0|1>
 * live says whether a call of proc_task_name runs this patch's version
 * right now (the callback calls it): klp's documented order is
 * pre_patch live=0, post_patch live=1, pre_unpatch live=1,
 * post_unpatch live=0. The patched proc_task_name shows "<comm>+cb<N>" in
 * the Name: line of /proc/PID/status.
 *
 * callbacks-v2.c is the same at version 2 as a replace patch;
 * callbacks-fail.c's pre_patch refuses with -EBUSY; callbacks-slow.c's
 * sleeps (KLPV_CB_PRE_PATCH_SLEEP_MS) and then logs "pre_patch done".
 *
 * proc_task_name is not exported; klpvisor resolves it from kallsyms.
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/delay.h>
#include <linux/string.h>

#ifndef KLPV_CB_VERSION
#define KLPV_CB_VERSION 1
#endif
#ifndef KLPV_CB_REPLACE
#define KLPV_CB_REPLACE false
#endif
#ifndef KLPV_CB_PRE_PATCH_RET
#define KLPV_CB_PRE_PATCH_RET 0
#endif
#ifndef KLPV_CB_TAG
#define KLPV_CB_TAG "v1"
#endif

void proc_task_name(struct seq_file *m, struct task_struct *p, bool escape);

static void livepatch_proc_task_name(struct seq_file *m, struct task_struct *p,
				     bool escape)
{
	char comm[TASK_COMM_LEN];

	__get_task_comm(comm, sizeof(comm), p);
	seq_printf(m, "%s+cb%d", comm, KLPV_CB_VERSION);
}

/*
 * Whether a call of proc_task_name runs this patch's version now: called
 * on a seq_file of our own, it prints "<comm>+cb<N>" only if so. (klpvisor
 * redirects through the kernel's ftrace, as klp does, so the entry's bytes
 * say nothing: the call is what tells.)
 */
static int live(void)
{
	char buf[128], want[16];
	struct seq_file m = { .buf = buf, .size = sizeof(buf) - 1 };

	proc_task_name(&m, current, false);
	buf[m.count < m.size ? m.count : m.size] = '\0';
	snprintf(want, sizeof(want), "+cb%d", KLPV_CB_VERSION);
	return strstr(buf, want) != NULL;
}

static void log_callback(const char *what, struct klp_object *obj)
{
	pr_info("klpv-cb %s %s obj=%s live=%d\n", KLPV_CB_TAG, what,
		obj->name ? obj->name : "vmlinux", live());
}

static int pre_patch(struct klp_object *obj)
{
	log_callback("pre_patch", obj);
#ifdef KLPV_CB_PRE_PATCH_SLEEP_MS
	msleep(KLPV_CB_PRE_PATCH_SLEEP_MS);
	pr_info("klpv-cb %s pre_patch done\n", KLPV_CB_TAG);
#endif
	return KLPV_CB_PRE_PATCH_RET;
}

static void post_patch(struct klp_object *obj)
{
	log_callback("post_patch", obj);
}

static void pre_unpatch(struct klp_object *obj)
{
	log_callback("pre_unpatch", obj);
}

static void post_unpatch(struct klp_object *obj)
{
	log_callback("post_unpatch", obj);
}

static struct klp_func funcs[] = {
	{ .old_name = "proc_task_name", .new_func = livepatch_proc_task_name },
	{ }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
		.callbacks = {
			.pre_patch = pre_patch,
			.post_patch = post_patch,
			.pre_unpatch = pre_unpatch,
			.post_unpatch = post_unpatch,
		},
	},
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.replace = KLPV_CB_REPLACE,
};

static int callbacks_init(void)
{
	return klp_enable_patch(&patch);
}

static void callbacks_exit(void)
{
}

module_init(callbacks_init);
module_exit(callbacks_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
