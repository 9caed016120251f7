// SPDX-License-Identifier: GPL-2.0
/*
 * callbacks-v2.c: callbacks-v1 at version 2, a replace patch. Replacing
 * v1, only v2's callbacks run (klp's atomic-replace rule).
 * klpv: modpost-warn
 */
#define KLPV_CB_VERSION 2
#define KLPV_CB_TAG "v2"
#define KLPV_CB_REPLACE true
#include "callbacks-v1.c"
