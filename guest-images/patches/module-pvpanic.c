// SPDX-License-Identifier: GPL-2.0
/*
 * module-pvpanic.c: one patch, three objects, as a cumulative patch for a
 * distribution kernel carries them:
 *  - vmlinux: cmdline_proc_show, as the kernel's livepatch-sample.c;
 *  - pvpanic (drivers/misc/pvpanic/pvpanic.ko, which the test guest's init
 *    loads): capability_show, the sysfs attribute `capability` of the
 *    pvpanic device, copied from Debian's linux-source-6.1 (the same in
 *    6.12) with a marker added to what it prints;
 *  - dummy (drivers/net/dummy.ko, which the test guest never loads):
 *    dummy_dev_init, which must wait for its module without making the
 *    rest of the patch unusable.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>
#include <linux/device.h>
#include <linux/sysfs.h>
#include <linux/netdevice.h>

/* drivers/misc/pvpanic/pvpanic.h, the driver's private state (6.1, 6.12). */
struct pvpanic_instance {
	void __iomem *base;
	unsigned int capability;
	unsigned int events;
	struct list_head list;
};

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

/* pvpanic.c's capability_show, with " patched" after the value. */
static ssize_t livepatch_capability_show(struct device *dev,
					 struct device_attribute *attr, char *buf)
{
	struct pvpanic_instance *pi = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%x patched\n", pi->capability);
}

/* The same body as drivers/net/dummy.c's dummy_dev_init. */
static int livepatch_dummy_dev_init(struct net_device *dev)
{
	dev->lstats = netdev_alloc_pcpu_stats(struct pcpu_lstats);
	if (!dev->lstats)
		return -ENOMEM;
	return 0;
}

static struct klp_func vmlinux_funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show },
	{ }
};

static struct klp_func pvpanic_funcs[] = {
	{ .old_name = "capability_show", .new_func = livepatch_capability_show },
	{ }
};

static struct klp_func dummy_funcs[] = {
	{ .old_name = "dummy_dev_init", .new_func = livepatch_dummy_dev_init },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = vmlinux_funcs },
	{ .name = "pvpanic", .funcs = pvpanic_funcs },
	{ .name = "dummy", .funcs = dummy_funcs },
	{ }
};

static struct klp_patch patch = { .mod = THIS_MODULE, .objs = objs };

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
