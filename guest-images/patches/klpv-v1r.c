// SPDX-License-Identifier: GPL-2.0
/*
 * klpv-v1r.c: klpv-v1 as a cumulative patch (.replace = true), for the
 * downgrade v2 -> v1: enabling it replaces v2, bringing back v1's f and g
 * and the original h. The body is klpv-v1.c's, word for word.
 * klpv: modpost-warn
 */
#define KLPV_CUMULATIVE
#include "klpv-v1.c"
