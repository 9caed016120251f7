// SPDX-License-Identifier: GPL-2.0
/*
 * bad-sympos.c: old_sympos 9 for version_show, which occurs only a few
 * times in the guest kernel's kallsyms (twice in 6.1, three times in 6.12):
 * there is no ninth one.
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
		.old_sympos = 9,
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
