// SPDX-License-Identifier: GPL-2.0
/*
 * callbacks-slow.c: callbacks-v1 whose pre_patch sleeps 3 s (msleep: it
 * may sleep, it runs in process context) before it returns 0, so a
 * transition with a shorter timeout gives up on it while it still runs.
 * klpv: modpost-warn
 */
#define KLPV_CB_VERSION 8
#define KLPV_CB_TAG "slow"
#define KLPV_CB_PRE_PATCH_SLEEP_MS 3000
#include "callbacks-v1.c"
