// SPDX-License-Identifier: GPL-2.0
/*
 * bad-unresolved.c: the new function references symbols the guest kernel
 * cannot provide: two that do not exist at all and one, cmdline_proc_show,
 * that exists only as a static (local) function. A kbuild module can
 * reference only global symbols; a static one needs a `.klp.sym` relocation
 * with its sympos. klpvisor must name all three in one error.
 *
 * modpost refuses undefined symbols: built with modpost warnings only.
 * klpv: modpost-warn
 * (insmod refuses the module too: "Unknown symbol".)
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

extern int klpv_missing_function(struct seq_file *m);
extern int klpv_missing_variable;
extern int cmdline_proc_show(struct seq_file *m, void *v);

static int livepatch_show(struct seq_file *m, void *v)
{
	if (klpv_missing_variable)
		return cmdline_proc_show(m, v);
	return klpv_missing_function(m);
}

static struct klp_func funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_show },
	{ }
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
