// SPDX-License-Identifier: GPL-2.0
/*
 * bad-kpatch-callback.c: kpatch-cmdline's layout (see there) with a
 * pre-patch callback in kpatch's callback table, the struct
 * kpatch_pre_patch_callback (kpatch-patch.h) that kpatch's
 * KPATCH_PRE_PATCH_CALLBACK macro puts in .kpatch.callbacks.pre_patch and
 * create-diff-object gives its object name. klpvisor
 * refuses it, naming kpatch's callback table: kpatch's callbacks get the
 * klp_object the hook allocates at init time, which has no place in the
 * module file.
 *
 * klpv: kpatch-hook
 */
#include <linux/kernel.h>
#include <linux/seq_file.h>
#include "kpatch-patch.h"

static int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "kpatch with a callback\n");
	return 0;
}

static int klpv_pre_patch(void *obj)
{
	return 0;
}

static const char kpatch_name[] __section(".kpatch.strings") = "cmdline_proc_show";
static const char kpatch_objname[] __section(".kpatch.strings") = "vmlinux";

static struct kpatch_pre_patch_callback kpatch_pre_patch_data
	__section(".kpatch.callbacks.pre_patch") __used = {
	.callback = klpv_pre_patch,
	.objname = (char *)kpatch_objname,
};

static struct kpatch_patch_func kpatch_funcs[] __section(".kpatch.funcs") __used = {
	{
		.new_addr = (unsigned long)cmdline_proc_show,
		.name = (char *)kpatch_name,
		.objname = (char *)kpatch_objname,
	},
};
