// SPDX-License-Identifier: GPL-2.0
/*
 * bad-extable.c: a patch whose new function writes to user memory with an
 * inline uaccess (user_access_begin + unsafe_put_user), so the module has an
 * `__ex_table` section. The kernel's module loader registers those fixups
 * (search_module_extables); nothing outside the guest can, so a fault in
 * the linked code would oops instead of returning -EFAULT: klpvisor must
 * refuse the module. (With insmod it works: time(2) behaves as before.)
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/uaccess.h>
#include <linux/timekeeping.h>
#include <linux/syscalls.h>

/* kernel/time/time.c's SYSCALL_DEFINE1(time), written with an inline uaccess. */
static long livepatch_sys_time(const struct pt_regs *regs)
{
	__kernel_old_time_t __user *tloc = (__kernel_old_time_t __user *)regs->di;
	__kernel_old_time_t i = (__kernel_old_time_t)ktime_get_real_seconds();

	if (tloc) {
		if (!user_access_begin(tloc, sizeof(*tloc)))
			return -EFAULT;
		unsafe_put_user(i, tloc, efault);
		user_access_end();
	}
	force_successful_syscall_return();
	return i;
efault:
	user_access_end();
	return -EFAULT;
}

static struct klp_func funcs[] = {
	{ .old_name = "__x64_sys_time", .new_func = livepatch_sys_time },
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
