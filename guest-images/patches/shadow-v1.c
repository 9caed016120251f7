// SPDX-License-Identifier: GPL-2.0
/*
 * shadow-v1.c: cmdline_proc_show counts its calls in a klp shadow variable
 * (the guest kernel's own klp_shadow_get_or_alloc) and prints
 * "klpv-shadow v<N> count=<calls>". The shadow variable hangs off a fixed
 * key, so shadow-v2 (the same source at version 2, a replace) finds the
 * variable v1 created and goes on counting: shadow data outlives the patch
 * that made it, as klp's shadow-variable documentation describes.
 *
 * Both introduce system state 7 (struct klp_state), at version 1 and 2:
 * v2 may replace v1 (an upgrade), v1 may not come back over v2, and a
 * replace patch without state 7 may replace neither.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

#ifndef KLPV_SHADOW_VERSION
#define KLPV_SHADOW_VERSION 1
#endif

/* Any pointer-sized key works: klp_shadow never dereferences it. */
#define KLPV_SHADOW_OBJ ((void *)0x6b6c7076UL)
#define KLPV_SHADOW_ID 0x6b6c7076UL

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	unsigned long *count;

	count = klp_shadow_get_or_alloc(KLPV_SHADOW_OBJ, KLPV_SHADOW_ID,
					sizeof(*count), GFP_KERNEL, NULL, NULL);
	if (!count) {
		seq_puts(m, "klpv-shadow no memory\n");
		return 0;
	}
	(*count)++;
	seq_printf(m, "klpv-shadow v%d count=%lu\n", KLPV_SHADOW_VERSION,
		   *count);
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = funcs },
	{ }
};

static struct klp_state states[] = {
	{ .id = 7, .version = KLPV_SHADOW_VERSION },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.states = states,
	.replace = true,
};

static int shadow_init(void)
{
	return klp_enable_patch(&patch);
}

static void shadow_exit(void)
{
}

module_init(shadow_init);
module_exit(shadow_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
