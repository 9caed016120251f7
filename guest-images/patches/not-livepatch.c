// SPDX-License-Identifier: GPL-2.0
/*
 * not-livepatch.c: an ordinary module (no struct klp_patch, no
 * MODULE_INFO(livepatch)). klpvisor must say it is not a livepatch module.
 */
#include <linux/module.h>
#include <linux/kernel.h>

static int plain_init(void)
{
	pr_info("an ordinary module\n");
	return 0;
}

static void plain_exit(void)
{
}

module_init(plain_init);
module_exit(plain_exit);
MODULE_LICENSE("GPL");
