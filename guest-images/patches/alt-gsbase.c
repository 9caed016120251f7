// SPDX-License-Identifier: GPL-2.0
/*
 * alt-gsbase.c: a patch whose new function has alternatives. It is
 * x86_gsbase_read_cpu_inactive from Debian's linux-source-6.1
 * (arch/x86/kernel/process_64.c), the value behind arch_prctl(ARCH_GET_GS)
 * for the calling task, with one change: a base of 0x4b4c5056000 reads
 * back one higher, so a caller sees which function answered.
 *
 * local_irq_save/local_irq_restore expand to paravirt calls that the
 * kernel rewrites with ALTERNATIVE (6.1: ALT_NOT(X86_FEATURE_XENPV) with
 * `pushf; pop %rax` and `push %rdi; popf`; 6.12: nested ALTERNATIVE_2
 * with ALT_CALL_ALWAYS, a DIRECT_CALL, first). The module loader applies
 * them at load, so klpvisor must too. No __ex_table, __jump_table or
 * __bug_table: those are still refused.
 *
 * __rdgsbase_inactive is static (noinstr) in vmlinux, so the copy reads
 * the inactive GS base with the same swapgs/rdgsbase/swapgs sequence.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/irqflags.h>
#include <asm/fsgsbase.h>
#include <asm/msr.h>

#define ALT_GSBASE_MARK 0x4b4c5056000UL

static unsigned long alt_rdgsbase_inactive(void)
{
	unsigned long gsbase;

	if (!static_cpu_has(X86_FEATURE_XENPV)) {
		native_swapgs();
		gsbase = rdgsbase();
		native_swapgs();
	} else {
		rdmsrl(MSR_KERNEL_GS_BASE, gsbase);
	}
	return gsbase;
}

static unsigned long livepatch_x86_gsbase_read_cpu_inactive(void)
{
	unsigned long gsbase;

	if (boot_cpu_has(X86_FEATURE_FSGSBASE)) {
		unsigned long flags;

		local_irq_save(flags);
		gsbase = alt_rdgsbase_inactive();
		local_irq_restore(flags);
	} else {
		rdmsrl(MSR_KERNEL_GS_BASE, gsbase);
	}

	if (gsbase == ALT_GSBASE_MARK)
		gsbase++;
	return gsbase;
}

static struct klp_func funcs[] = {
	{
		.old_name = "x86_gsbase_read_cpu_inactive",
		.new_func = livepatch_x86_gsbase_read_cpu_inactive,
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

static int alt_gsbase_init(void)
{
	return klp_enable_patch(&patch);
}

static void alt_gsbase_exit(void)
{
}

module_init(alt_gsbase_init);
module_exit(alt_gsbase_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
