// SPDX-License-Identifier: GPL-2.0
/*
 * bad-big.c: a valid livepatch whose data (a 32 MiB .bss array) is larger
 * than the patch arena (16 MiB by default): klpvisor must refuse it with
 * "arena full" and write nothing.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static char big[32 << 20];

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	big[0]++;
	seq_printf(m, "%s\n", "big");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = livepatch_cmdline_proc_show,
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
