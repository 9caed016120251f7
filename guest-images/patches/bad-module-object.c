// SPDX-License-Identifier: GPL-2.0
/*
 * bad-module-object.c: a patch for a function the module it names does not
 * have. Object "pvpanic" (drivers/misc/pvpanic/pvpanic.ko, which the test
 * guest's init loads) is resolved against that module's own symbols, as
 * klp's klp_find_object_symbol does, so klpv_no_such_function is not found
 * there: the patch must be refused with nothing written.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>

static int livepatch_no_such_function(void)
{
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "klpv_no_such_function", .new_func = livepatch_no_such_function },
	{ }
};

static struct klp_object objs[] = { { .name = "pvpanic", .funcs = funcs }, { } };

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
