// SPDX-License-Identifier: GPL-2.0
/*
 * shadow-v2.c: shadow-v1 at version 2 (prints "v2", state 7 version 2).
 * Replacing v1 it finds v1's shadow variable and goes on counting.
 */
#define KLPV_SHADOW_VERSION 2
#include "shadow-v1.c"
