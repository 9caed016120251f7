// SPDX-License-Identifier: GPL-2.0
/*
 * callbacks-fail.c: callbacks-v1 whose pre_patch refuses with -EBUSY, so
 * klp (and klpvisor) must not enable it: no function redirected, no other
 * callback of it run.
 * klpv: modpost-warn
 */
#define KLPV_CB_VERSION 9
#define KLPV_CB_TAG "fail"
#define KLPV_CB_PRE_PATCH_RET (-EBUSY)
#include "callbacks-v1.c"
