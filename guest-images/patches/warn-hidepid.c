// SPDX-License-Identifier: GPL-2.0
/*
 * warn-hidepid.c: a patch whose code holds a WARN (a __bug_table entry).
 *
 * proc_show_options and hidepid2str are copied from Debian's
 * linux-source-6.1 (fs/proc/inode.c), with one change: hidepid2str no
 * longer names "ptraceable", so showing the options of a proc mount with
 * hidepid=ptraceable takes the WARN_ONCE path and shows
 * "hidepid=unknown". hidepid2str is inlined into proc_show_options, so
 * the WARN's ud2 is in patch code: without the patch registered as a
 * module the guest would oops on it; with it, the guest prints the
 * kernel's usual "WARNING: ... at <file>:<line> <function>" report, with
 * a call trace through the patch frame, and carries on.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>
#include <linux/proc_fs.h>
#include <linux/fs.h>
#include <linux/uidgid.h>
#include <linux/user_namespace.h>

static inline const char *hidepid2str(enum proc_hidepid v)
{
	switch (v) {
		case HIDEPID_OFF: return "off";
		case HIDEPID_NO_ACCESS: return "noaccess";
		case HIDEPID_INVISIBLE: return "invisible";
		case HIDEPID_NOT_PTRACEABLE: break;	/* the change */
	}
	WARN_ONCE(1, "bad hide_pid value: %d\n", v);
	return "unknown";
}

static int livepatch_proc_show_options(struct seq_file *seq, struct dentry *root)
{
	struct proc_fs_info *fs_info = proc_sb_info(root->d_sb);

	if (!gid_eq(fs_info->pid_gid, GLOBAL_ROOT_GID))
		seq_printf(seq, ",gid=%u", from_kgid_munged(&init_user_ns, fs_info->pid_gid));
	if (fs_info->hide_pid != HIDEPID_OFF)
		seq_printf(seq, ",hidepid=%s", hidepid2str(fs_info->hide_pid));
	if (fs_info->pidonly != PROC_PIDONLY_OFF)
		seq_printf(seq, ",subset=pid");

	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "proc_show_options",
		.new_func = livepatch_proc_show_options,
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
