// SPDX-License-Identifier: GPL-2.0
/*
 * kpatch-cmdline.c: a livepatch module in kpatch-build's layout. This file
 * plays the part of create-diff-object's output.o; build-livepatch links
 * it with kpatch's own patch hook (livepatch-patch-hook.c, kpatch.lds) from
 * Debian's kpatch-build package, as kpatch-build does. The module has no
 * static struct klp_patch: the hook builds one at init time from the
 * description below, and klpvisor reads that description instead.
 *
 *  - The fixed function keeps its original name, as kpatch-build's output
 *    does: cmdline_proc_show, copied from Debian's linux-source-6.1
 *    (fs/proc/cmdline.c; the same in 6.12) with " kpatch" added before the
 *    newline.
 *  - It reads saved_command_line, which vmlinux does not export: kpatch's
 *    create-klp-module turns such a reference into a klp relocation
 *    against .klp.sym.vmlinux.saved_command_line,0; here the klp-sym line
 *    below does the same (see build-livepatch).
 *  - .kpatch.funcs holds one struct kpatch_patch_func (kpatch-patch.h)
 *    pointing at it, its names in .kpatch.strings, as create-diff-object
 *    writes them. kpatch-build's default KLP_REPLACE_ENABLE (true) makes it
 *    a replace patch.
 *
 * klpv: kpatch-hook
 * klpv: modpost-warn
 * klpv: klp-sym klpv_saved_command_line=.klp.sym.vmlinux.saved_command_line,0
 */
#include <linux/kernel.h>
#include <linux/seq_file.h>
#include "kpatch-patch.h"

extern char *klpv_saved_command_line;

static int cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, klpv_saved_command_line);
	seq_puts(m, " kpatch");
	seq_putc(m, '\n');
	return 0;
}

static const char kpatch_name[] __section(".kpatch.strings") = "cmdline_proc_show";
static const char kpatch_objname[] __section(".kpatch.strings") = "vmlinux";

static struct kpatch_patch_func kpatch_funcs[] __section(".kpatch.funcs") __used = {
	{
		.new_addr = (unsigned long)cmdline_proc_show,
		.sympos = 0,
		.name = (char *)kpatch_name,
		.objname = (char *)kpatch_objname,
	},
};
