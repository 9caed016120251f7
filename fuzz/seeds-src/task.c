// SPDX-License-Identifier: Apache-2.0
/*
 * A miniature task_struct for the btf fuzz target's seeds: what the task
 * walk looks up, with the shapes that make BTF lookups interesting
 * (anonymous structs and unions, bitfields, typedef and const chains,
 * arrays, enums, function pointers, floats). Built by ./build.
 */
typedef int pid_t;
struct list_head { struct list_head *next, *prev; };
struct thread_struct { unsigned long ip, sp; };
enum state { RUNNING, SLEEPING };
struct signal_struct { int nr; struct list_head thread_head; };
struct task_struct {
	unsigned int __state;
	struct list_head tasks;
	struct {
		unsigned int state_a;
		unsigned int flag_bit:3, other:5;
	};
	union {
		unsigned long u_a;
		int u_b;
	};
	const pid_t pid;
	volatile pid_t tgid;
	char comm[16];
	enum state st;
	double load;
	void (*fn)(struct task_struct *);
	struct signal_struct *signal;
	struct list_head thread_node;
	struct thread_struct thread;
	void *stack;
};
struct rq { int cpu; struct task_struct *idle; };
struct task_struct t;
struct rq r;
