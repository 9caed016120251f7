// SPDX-License-Identifier: GPL-2.0
/*
 * module-binfmt.c: a cumulative patch (.replace = true) with two objects,
 * for a module the test guest loads only after the patch is applied:
 *  - vmlinux: cmdline_proc_show prints "module-binfmt klpv1 cmdline";
 *  - binfmt_misc (fs/binfmt_misc.ko: in the test guest's initramfs, not
 *    loaded at boot; klpv-modload insmods and rmmods it): bm_status_read,
 *    what `cat /proc/sys/fs/binfmt_misc/status` reads, copied from Debian's
 *    linux-source with the marker added: "enabled klpv1" for "enabled".
 *
 * The function differs between the two guest kernels, so each gets its own:
 *  - 6.1: the state is binfmt_misc's file-static `int enabled`, a symbol
 *    only the module has. The copy reaches it as klp-convert and
 *    kpatch-build make a patch reach it: through the klp symbol
 *    .klp.sym.binfmt_misc.enabled,0 (SHN_LIVEPATCH) and a relocation in
 *    .klp.rela.binfmt_misc..text, which is applied only once binfmt_misc
 *    is loaded. In C it is the extern klpv_binfmt_enabled (hence
 *    modpost-warn); build-livepatch renames it (the klp-sym line below)
 *    and runs guest-images/klp-convert.
 *  - 6.7 and later (6.12): binfmt_misc is per user namespace; the state is
 *    found through the file's inode (i_binfmt_misc, a static helper the
 *    compiler inlined into bm_status_read, copied here as one line), so
 *    the function needs no symbol of the module.
 *
 * The binfmt_misc object has all four klp callbacks. Each logs
 * "klpv-cb <mark> <callback> obj=<object> live=<0|1>", live saying whether
 * a call of binfmt_misc's own bm_status_read reaches the copy at that
 * moment (its address is the klp symbol .klp.sym.binfmt_misc.bm_status_read,0,
 * so it is known only once the module is loaded): either its entry jumps
 * to the copy (a redirect written as the module loads), or the guest's
 * ftrace sends it there (an ftrace_ops filtered to that entry whose
 * private word is the copy: klpvisor's redirect through ftrace; the list
 * and the hash lookup are vmlinux's, reached through klp symbols too).
 * klp runs pre_patch before the object is patched and post_patch after,
 * when the module loads later (klp_module_coming), and
 * pre_unpatch/post_unpatch around its unload.
 *
 * module-binfmt-v2.c is this file with KLPV_BINFMT_V2 ("klpv2"), for a
 * replace and a rollback across both objects.
 *
 * klpv: modpost-warn
 * klpv: klp-sym klpv_binfmt_enabled=.klp.sym.binfmt_misc.enabled,0
 * klpv: klp-sym klpv_bm_status_read=.klp.sym.binfmt_misc.bm_status_read,0
 * klpv: klp-sym klpv_ftrace_ops_list=.klp.sym.vmlinux.ftrace_ops_list,0
 * klpv: klp-sym klpv_ftrace_list_end=.klp.sym.vmlinux.ftrace_list_end,0
 * klpv: klp-sym klpv_ftrace_lookup_ip=.klp.sym.vmlinux.ftrace_lookup_ip,0
 */
#include <linux/module.h>
#include <linux/ftrace.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>
#include <linux/fs.h>
#include <linux/string.h>
#include <linux/version.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
#include <linux/binfmts.h>
#include <linux/user_namespace.h>
#endif

#ifdef KLPV_BINFMT_V2
#define KLPV_MARK "klpv2"
#else
#define KLPV_MARK "klpv1"
#endif

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "module-binfmt " KLPV_MARK " cmdline");
	return 0;
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 7, 0)
/* fs/binfmt_misc.c: `static int enabled = 1;` (klp symbol, see above). */
extern int klpv_binfmt_enabled;

/* fs/binfmt_misc.c (6.1) bm_status_read, with the marker. */
static ssize_t
livepatch_bm_status_read(struct file *file, char __user *buf, size_t nbytes, loff_t *ppos)
{
	char *s = klpv_binfmt_enabled ? "enabled " KLPV_MARK "\n" : "disabled " KLPV_MARK "\n";

	return simple_read_from_buffer(buf, nbytes, ppos, s, strlen(s));
}
#else
/* fs/binfmt_misc.c (6.12) bm_status_read, with the marker. */
static ssize_t
livepatch_bm_status_read(struct file *file, char __user *buf, size_t nbytes, loff_t *ppos)
{
	struct binfmt_misc *misc;
	char *s;

	/* i_binfmt_misc(file_inode(file)) */
	misc = file_inode(file)->i_sb->s_user_ns->binfmt_misc;
	s = misc->enabled ? "enabled " KLPV_MARK "\n" : "disabled " KLPV_MARK "\n";
	return simple_read_from_buffer(buf, nbytes, ppos, s, strlen(s));
}
#endif

/* binfmt_misc's own bm_status_read (klp symbol, see above). */
extern unsigned char klpv_bm_status_read[];

/* kernel/trace/ftrace.c's list of ftrace_ops and its hash lookup. */
extern struct ftrace_ops __rcu *klpv_ftrace_ops_list;
extern struct ftrace_ops klpv_ftrace_list_end;
extern struct ftrace_func_entry *klpv_ftrace_lookup_ip(struct ftrace_hash *hash, unsigned long ip);

/* Whether an ftrace_ops filtered to site `ip` redirects it to the copy. */
static int live_through_ftrace(unsigned long ip)
{
	struct ftrace_ops *op;
	int found = 0;

	preempt_disable_notrace();
	for (op = rcu_dereference_raw(klpv_ftrace_ops_list);
	     op && op != &klpv_ftrace_list_end; op = rcu_dereference_raw(op->next)) {
		if (op->private == (void *)livepatch_bm_status_read && op->func_hash &&
		    klpv_ftrace_lookup_ip(rcu_dereference_raw(op->func_hash->filter_hash), ip)) {
			found = 1;
			break;
		}
	}
	preempt_enable_notrace();
	return found;
}

/* Whether a call of bm_status_read reaches the copy (see above). */
static int live(void)
{
	const unsigned char *p = klpv_bm_status_read;
	static const unsigned char endbr64[] = { 0xf3, 0x0f, 0x1e, 0xfa };
	long target;

	if (!memcmp(p, endbr64, 4))
		p += 4;
	if (p[0] != 0xe9)
		return live_through_ftrace((unsigned long)p);
	target = (long)(p + 5) + *(const int *)(p + 1);
	return target == (long)livepatch_bm_status_read;
}

static void log_callback(const char *what, struct klp_object *obj)
{
	pr_info("klpv-cb %s %s obj=%s live=%d\n", KLPV_MARK, what,
		obj->name ? obj->name : "vmlinux", live());
}

static int pre_patch(struct klp_object *obj)
{
	log_callback("pre_patch", obj);
	return 0;
}

static void post_patch(struct klp_object *obj)
{
	log_callback("post_patch", obj);
}

static void pre_unpatch(struct klp_object *obj)
{
	log_callback("pre_unpatch", obj);
}

static void post_unpatch(struct klp_object *obj)
{
	log_callback("post_unpatch", obj);
}

static struct klp_func vmlinux_funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = livepatch_cmdline_proc_show },
	{ }
};

static struct klp_func binfmt_misc_funcs[] = {
	{ .old_name = "bm_status_read", .new_func = livepatch_bm_status_read },
	{ }
};

static struct klp_object objs[] = {
	{ .funcs = vmlinux_funcs },
	{
		.name = "binfmt_misc",
		.funcs = binfmt_misc_funcs,
		.callbacks = {
			.pre_patch = pre_patch,
			.post_patch = post_patch,
			.pre_unpatch = pre_unpatch,
			.post_unpatch = post_unpatch,
		},
	},
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
	.replace = true,
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
