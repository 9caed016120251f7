// SPDX-License-Identifier: GPL-2.0
/*
 * bad-init-ref.c: the new function reads a variable in `.init.data`. The
 * kernel frees init sections after module_init returns (modpost warns of
 * the section mismatch); klpvisor never runs module_init and does not load
 * `.init.*` at all, so a patch that refers to them must be refused.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static char banner[] __initdata = "from init data\n";

static int livepatch_show(struct seq_file *m, void *v)
{
	seq_puts(m, banner);
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_show },
	{ }
};

static struct klp_object objs[] = { { .funcs = funcs }, { } };

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int __init bad_init(void)
{
	return klp_enable_patch(&patch);
}

static void bad_exit(void)
{
}

module_init(bad_init);
module_exit(bad_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
