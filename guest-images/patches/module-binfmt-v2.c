// SPDX-License-Identifier: GPL-2.0
/*
 * module-binfmt-v2.c: module-binfmt.c's cumulative patch, the next version:
 * the same two objects (vmlinux's cmdline_proc_show, binfmt_misc's
 * bm_status_read), printing "module-binfmt klpv2 cmdline" and
 * "enabled klpv2". Applied over module-binfmt it replaces it in both
 * objects at once; a rollback brings module-binfmt back in both.
 * klpv: modpost-warn
 * klpv: klp-sym klpv_binfmt_enabled=.klp.sym.binfmt_misc.enabled,0
 * klpv: klp-sym klpv_bm_status_read=.klp.sym.binfmt_misc.bm_status_read,0
 * klpv: klp-sym klpv_ftrace_ops_list=.klp.sym.vmlinux.ftrace_ops_list,0
 * klpv: klp-sym klpv_ftrace_list_end=.klp.sym.vmlinux.ftrace_list_end,0
 * klpv: klp-sym klpv_ftrace_lookup_ip=.klp.sym.vmlinux.ftrace_lookup_ip,0
 */
#define KLPV_BINFMT_V2
#include "module-binfmt.c"
