// SPDX-License-Identifier: GPL-2.0
/*
 * percpu-uptime.c: a patch with per-CPU variables of its own (a
 * .data..percpu section). The kernel's module loader would allocate them
 * per CPU (percpu_modalloc), base their symbols on that block
 * (simplify_symbols) and copy their initial values into every possible
 * CPU's copy (percpu_modcopy); klpvisor does the same from outside.
 *
 * uptime_proc_show is copied from Debian's linux-source-6.1
 * (fs/proc/uptime.c; 6.12's is the same), which sums the per-CPU idle
 * time of every possible CPU, with one change: each read of /proc/uptime
 * also counts itself in the patch's per-CPU klpv_uptime_reads (this_cpu_inc,
 * a %gs-relative access), which starts at KLPV_START on every CPU, and a
 * second line shows the sum of every possible CPU's count (per_cpu, the
 * block plus each CPU's offset) and how many CPUs were summed:
 * "klpv-percpu <sum> <cpus>". After n reads with the patch applied the sum
 * is KLPV_START * cpus + n.
 * get_idle_time is not exported to modules; this test module is built
 * with modpost warnings only.
 * klpv: modpost-warn
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/percpu.h>
#include <linux/seq_file.h>
#include <linux/time.h>
#include <linux/time_namespace.h>
#include <linux/kernel_stat.h>

#define KLPV_START 1000

static DEFINE_PER_CPU(unsigned long, klpv_uptime_reads) = KLPV_START;

static int livepatch_uptime_proc_show(struct seq_file *m, void *v)
{
	struct timespec64 uptime;
	struct timespec64 idle;
	u64 idle_nsec;
	u32 rem;
	int i;
	unsigned long reads = 0;	/* the change */
	unsigned int cpus = 0;		/* the change */

	this_cpu_inc(klpv_uptime_reads);	/* the change */

	idle_nsec = 0;
	for_each_possible_cpu(i) {
		struct kernel_cpustat kcs;

		kcpustat_cpu_fetch(&kcs, i);
		idle_nsec += get_idle_time(&kcs, i);
		reads += per_cpu(klpv_uptime_reads, i);	/* the change */
		cpus++;					/* the change */
	}

	ktime_get_boottime_ts64(&uptime);
	timens_add_boottime(&uptime);

	idle.tv_sec = div_u64_rem(idle_nsec, NSEC_PER_SEC, &rem);
	idle.tv_nsec = rem;
	seq_printf(m, "%lu.%02lu %lu.%02lu\n",
			(unsigned long) uptime.tv_sec,
			(uptime.tv_nsec / (NSEC_PER_SEC / 100)),
			(unsigned long) idle.tv_sec,
			(idle.tv_nsec / (NSEC_PER_SEC / 100)));
	seq_printf(m, "klpv-percpu %lu %u\n", reads, cpus);	/* the change */
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "uptime_proc_show",
		.new_func = livepatch_uptime_proc_show,
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
