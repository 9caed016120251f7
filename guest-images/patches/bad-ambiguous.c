// SPDX-License-Identifier: GPL-2.0
/*
 * bad-ambiguous.c: version_show is the name of two static functions in the Debian
 * 6.1 cloud kernel (two 't' lines in /proc/kallsyms); without old_sympos klp
 * cannot tell which one is meant and refuses, and so must klpvisor.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int livepatch_show(struct seq_file *m, void *v)
{
	seq_puts(m, "patched\n");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "version_show",
		.new_func = livepatch_show,
		.old_sympos = 0,
	}, { }
};

static struct klp_object objs[] = { { .funcs = funcs }, { } };

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

static int bad_init(void)
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
