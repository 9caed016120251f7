// SPDX-License-Identifier: GPL-2.0
/*
 * bad-module-object.c: a patch for a function of a kernel module (object
 * "dummy", drivers/net/dummy.ko) rather than of vmlinux. klp patches it when
 * the module loads; klpvisor supports only vmlinux objects for now and must
 * say so.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/netdevice.h>

/* The same body as drivers/net/dummy.c's dummy_dev_init. */
static int livepatch_dummy_dev_init(struct net_device *dev)
{
	dev->lstats = netdev_alloc_pcpu_stats(struct pcpu_lstats);
	if (!dev->lstats)
		return -ENOMEM;
	return 0;
}

static struct klp_func funcs[] = {
	{ .old_name = "dummy_dev_init", .new_func = livepatch_dummy_dev_init },
	{ }
};

static struct klp_object objs[] = { { .name = "dummy", .funcs = funcs }, { } };

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
