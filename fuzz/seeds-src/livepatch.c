// SPDX-License-Identifier: Apache-2.0
/*
 * A stand-alone livepatch module for the `module` fuzz target's seed
 * corpus: the same sections, symbols and relocations kbuild gives
 * guest-images/patches/*.c (struct klp_patch -> klp_object -> klp_func
 * through R_X86_64_64, .modinfo, .gnu.linkonce.this_module, __mcount_loc,
 * `jmp __x86_return_thunk`, calls to kernel functions), but compiled by
 * plain gcc, without kernel headers, so it builds anywhere. The klp
 * structures copy Linux 6.1's include/linux/livepatch.h with the members
 * the engine does not read reduced to padding of the same size; gcc -gbtf
 * turns them into the BTF the fuzz target parses the module with.
 *
 * Built by ./build (see there); the outputs are committed.
 */
#include <stdbool.h>

struct list_head { struct list_head *next, *prev; };
struct kobject { char opaque[64]; };
struct work_struct { char opaque[32]; };
struct completion { char opaque[32]; };

struct module {
	int state;
	struct list_head list;
	char name[56];
	char rest[960];
};

struct klp_object;

struct klp_func {
	const char *old_name;
	void *new_func;
	unsigned long old_sympos;
	void *old_func;
	struct kobject kobj;
	struct list_head node;
	struct list_head stack_node;
	unsigned long old_size, new_size;
	bool nop;
	bool patched;
	bool transition;
};

struct klp_callbacks {
	int (*pre_patch)(struct klp_object *obj);
	void (*post_patch)(struct klp_object *obj);
	void (*pre_unpatch)(struct klp_object *obj);
	void (*post_unpatch)(struct klp_object *obj);
	bool post_unpatch_enabled;
};

struct klp_object {
	const char *name;
	struct klp_func *funcs;
	struct klp_callbacks callbacks;
	struct kobject kobj;
	struct list_head func_list;
	struct list_head node;
	struct module *mod;
	bool dynamic;
	bool patched;
};

struct klp_state {
	unsigned long id;
	unsigned int version;
	void *data;
};

struct klp_patch {
	struct module *mod;
	struct klp_object *objs;
	struct klp_state *states;
	bool replace;
	struct list_head list;
	struct kobject kobj;
	struct list_head obj_list;
	bool enabled;
	bool forced;
	struct work_struct free_work;
	struct completion finish;
};

/* Kernel functions the patch calls: undefined, resolved through kallsyms. */
struct seq_file;
extern int seq_printf(struct seq_file *m, const char *fmt, ...);
extern int klp_enable_patch(struct klp_patch *patch);

struct module __this_module
	__attribute__((section(".gnu.linkonce.this_module"))) = {
	.name = "fuzz_livepatch",
};

static const char modinfo[]
	__attribute__((section(".modinfo"), used, aligned(1))) =
	"license=GPL\0"
	"livepatch=Y\0"
	"name=fuzz_livepatch\0"
	"vermagic=6.1.0-fuzz SMP preempt mod_unload modversions \0";

static int counter;

__attribute__((noinline)) static int
livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	counter++;
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

__attribute__((noinline)) static int livepatch_dup_fn(void)
{
	return counter;
}

static void post_patch(struct klp_object *obj)
{
	counter = 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = livepatch_cmdline_proc_show,
	},
	{
		.old_name = "dup_fn",
		.new_func = livepatch_dup_fn,
		.old_sympos = 2,
	},
	{ }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
		.callbacks = { .post_patch = post_patch },
	},
	{ }
};

static struct klp_state states[] = {
	{ .id = 7, .version = 1 },
	{ }
};

static struct klp_patch patch = {
	.mod = &__this_module,
	.objs = objs,
	.states = states,
};

__attribute__((section(".init.text"))) int init_module(void)
{
	return klp_enable_patch(&patch);
}
