// SPDX-License-Identifier: GPL-2.0
/*
 * bad-module-binfmt.c: a patch whose module object cannot be resolved, for
 * a module that is not loaded when the patch is applied:
 *  - vmlinux: cmdline_proc_show prints "bad-module-binfmt cmdline" (valid);
 *  - binfmt_misc (fs/binfmt_misc.ko, which the test guest loads only
 *    later): klpv_no_such_binfmt_function, which binfmt_misc does not have.
 * Applied while binfmt_misc is absent, the patch is accepted (the object
 * waits, as klp accepts it). When the guest then loads binfmt_misc, the
 * object cannot be linked, and the module must fail to load with EINVAL,
 * as klp_module_coming makes it fail, the rest of the guest untouched.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "bad-module-binfmt cmdline");
	return 0;
}

static int livepatch_no_such_binfmt_function(void)
{
	return 0;
}

static struct klp_func vmlinux_funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show },
	{ }
};

static struct klp_func binfmt_misc_funcs[] = {
	{ .old_name = "klpv_no_such_binfmt_function",
	  .new_func = livepatch_no_such_binfmt_function },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = vmlinux_funcs },
	{ .name = "binfmt_misc", .funcs = binfmt_misc_funcs },
	{ }
};

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
