// SPDX-License-Identifier: GPL-2.0
/*
 * efault-zero.c: a patch whose code holds an inlined user access: the
 * stac/clac alternatives of clear_user and its exception-table entry.
 *
 * read_zero is copied from Debian's linux-source-6.1 (drivers/char/mem.c),
 * with one change: one read returns at most 64 KiB, so `dd bs=1M` of
 * /dev/zero reads short ("0+1 records"). A bad buffer must still make
 * read() return -EFAULT: the fault in the patch's own clear_user is fixed
 * up through the patch's exception table, which the guest kernel finds
 * because the patch is registered as a module; and with SMAP the stores
 * work only because the alternatives put stac/clac in place.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/fs.h>
#include <linux/sched/signal.h>
#include <linux/uaccess.h>
#include <linux/minmax.h>

#define READ_ZERO_MAX (64 * 1024)	/* the change */

static ssize_t livepatch_read_zero(struct file *file, char __user *buf,
				   size_t count, loff_t *ppos)
{
	size_t cleared = 0;

	count = min_t(size_t, count, READ_ZERO_MAX);	/* the change */
	while (count) {
		size_t chunk = min_t(size_t, count, PAGE_SIZE);
		size_t left;

		left = clear_user(buf + cleared, chunk);
		if (unlikely(left)) {
			cleared += (chunk - left);
			if (!cleared)
				return -EFAULT;
			break;
		}
		cleared += chunk;
		count -= chunk;

		if (signal_pending(current))
			break;
		cond_resched();
	}

	return cleared;
}

static struct klp_func funcs[] = {
	{
		.old_name = "read_zero",
		.new_func = livepatch_read_zero,
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
